"""Ancestral sampling: from t to s < t each masked position is revealed with the (backward) schedule's probability
(alpha_i(s) - alpha_i(t)) / (1 - alpha_i(t)), then its token drawn from p_theta(. | z_t). NFE = number of steps.
LoMDM reveals with its backward scheduler's velocities, 1 - (s/t)^{w_hat_i}.

    python -m mdm_scale.sampling runs/tiny/checkpoints/step_00000600 --num-samples 4 --nfe 64 --top-p 0.9
    python -m mdm_scale.sampling CKPT --prompt "In the beginning"        # prefix conditioning
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch import Tensor

from mdm_scale.denoiser import Denoiser
from mdm_scale.schedules import Schedule


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """[n, V] probabilities renormalised over each row's smallest top set with mass >= top_p (the top token is
    always kept)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
    keep_sorted = before < top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


@torch.no_grad()
def ancestral_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    *,
    num_samples: int,
    seq_len: int,
    nfe: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompt: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Generate [num_samples, seq_len] token ids with no mask token left.

    Args:
        nfe: number of denoiser calls; the time grid is uniform from 1 to 0.
        temperature: divides the logits; top_p: nucleus sampling (the smallest set of tokens with probability
            >= top_p; 1 = the full distribution, -> 0 = greedy).
        prompt: optional [num_samples, seq_len] ids with -1 where the sampler should generate; other
            positions are fixed (infilling / prefix conditioning).
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    was_training = denoiser.training
    denoiser.eval()
    mask_id = denoiser.mask_id
    z = torch.full((num_samples, seq_len), mask_id, dtype=torch.long, device=device)
    if prompt is not None:
        z = torch.where(prompt >= 0, prompt.to(device), z)
    times = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    for k in range(nfe):
        t = times[k].expand(num_samples).to(device)
        s = times[k + 1].expand(num_samples).to(device)
        hidden = denoiser(z, t.float())  # [b, l, h]
        backward_logits = None
        if "backward_scheduler" in denoiser.scheduler_heads:
            backward_logits = denoiser.scheduler_logits("backward_scheduler", hidden)
        reveal_prob = schedule.reveal_probability(t, s, seq_len, backward_logits)
        if k == nfe - 1:
            reveal_prob = torch.ones_like(reveal_prob)  # s = 0: everything is clean
        masked = z == mask_id
        uniforms = torch.rand(num_samples, seq_len, generator=generator, dtype=torch.float64).to(device)
        reveal = masked & (uniforms < reveal_prob)
        if not reveal.any():
            continue
        logits = denoiser.output_logits(hidden[reveal]).float()  # [n, v_shard]
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        probs = torch.softmax(logits[:, : denoiser.vocab_size] / max(temperature, 1e-6), dim=-1)  # [n, V]
        if top_p < 1.0:
            probs = nucleus(probs, top_p)
        tokens = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
        z = z.masked_scatter(reveal, tokens)
    denoiser.train(was_training)
    return z


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    from mdm_scale.export import load_for_inference

    p = argparse.ArgumentParser(prog="python -m mdm_scale.sampling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--nfe", type=int, default=64, help="denoiser calls (time steps)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--prompt", default=None, help="text the samples start with (prefix conditioning)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg, tokenizer, model, dims = load_for_inference(args.checkpoint)
    seq_len = args.seq_len or cfg.data.seq_len
    prompt = None
    if args.prompt:
        ids = tokenizer.encode(args.prompt)[:seq_len]
        prompt = torch.full((args.num_samples, seq_len), -1, dtype=torch.long)
        prompt[:, : len(ids)] = torch.tensor(ids)
    start = time.perf_counter()
    ids = ancestral_sample(model["denoiser"], model["schedule"], num_samples=args.num_samples, seq_len=seq_len,
                           nfe=args.nfe, generator=torch.Generator().manual_seed(args.seed),
                           temperature=args.temperature, top_p=args.top_p, prompt=prompt, device=dims.device)
    seconds = time.perf_counter() - start
    for i, row in enumerate(ids.cpu()):
        print(f"--- sample {i} ---\n{tokenizer.decode(row.tolist())}")
    print(f"NFE {args.nfe}, {ids.numel() / seconds:,.0f} tokens/s ({args.num_samples} x {seq_len} in {seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
