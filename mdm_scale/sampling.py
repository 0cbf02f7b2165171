"""Ancestral sampling: from t to s < t each masked position is revealed with the (backward) schedule's probability
(alpha_i(s) - alpha_i(t)) / (1 - alpha_i(t)), then its token drawn from p_theta(. | z_t). NFE = number of steps.
LoMDM reveals with its backward scheduler's velocities, 1 - (s/t)^{w_hat_i}.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch import Tensor

from mdm_scale.denoiser import Denoiser
from mdm_scale.schedules import Schedule


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
    prompt: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Generate [num_samples, seq_len] token ids with no mask token left.

    Args:
        nfe: number of denoiser calls; the time grid is uniform from 1 to 0.
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
        tokens = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
        z = z.masked_scatter(reveal, tokens)
    denoiser.train(was_training)
    return z
