"""Held-out NELBO (MDLM's protocol): antithetic times, several per batch, a fixed noise seed; and the eval command.

    python -m mdm_scale.evaluation runs/tiny/checkpoints/step_00000600 [--time-samples 32] [--batches all]
    torchrun --nproc-per-node 8 -m mdm_scale.evaluation CKPT --data-path data/owt   # zero-shot, data-parallel

The command evaluates a checkpoint (any training layout; consolidated to one model per rank) on a split of its own
data or of any preprocessed corpus, batches strided over ranks, noise seeded per batch so the result does not
depend on the number of ranks. It prints NELBO (nats/token) with its standard error over batches (data and noise),
bits/token and the perplexity bound; for the autoregressive objective also the exact NLL (one masked position per
pass: the causal likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from data_pipeline.datasets import embedded_corpus_shards, open_split, remote_cache_root, split_document_ids
from mdm_scale.cli import expected_errors
from mdm_scale.config import LEARNED_KINDS, ObjectiveConfig
from mdm_scale.denoiser import Denoiser
from mdm_scale.model import load_for_inference
from mdm_scale.objective import document_masks, draw_noise, nelbo
from mdm_scale.pipeline import last_stage_mean, pipeline_nelbo
from mdm_scale.schedules import Schedule
from mdm_scale.schedules.block import BlockSchedule
from mdm_scale.time_sampling import TimeSampler, grid_times


@torch.no_grad()
def order_form(objective: ObjectiveConfig) -> ObjectiveConfig:
    """The order form at t_min = 0: unbiased for every polynomial-family schedule, learned exponents included."""
    return replace(objective, estimator="order", t_min=0.0, time_power=1.0, t_sampler="antithetic")


def truncation_biased(objective: ObjectiveConfig) -> bool:
    """The time form with learned exponents: positions with w_i < 1 lose a fraction t_min^{w_i} of their loss
    (docs/objective.md 5b), so its NELBO is optimistic; `order_form` is reported beside it."""
    return objective.schedule.kind in LEARNED_KINDS and objective.estimator == "time"


def evaluate_nelbo(
    denoiser: Denoiser,
    schedule: Schedule,
    batches: Iterable[Tensor],
    cfg: ObjectiveConfig,
    *,
    time_samples: int = 2,
    seed: int = 1234,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean per-token NELBO over `batches`, with `time_samples` antithetic draws per batch.

    Batches are [b, l] token ids or [b, 2, l] (tokens, document ids) as `data_pipeline.datasets.open_split` gives.

    The noise comes from a generator seeded with `seed` each call, so successive evaluations of a changing
    model see identical t and masks (a less noisy curve). Returns nelbo, bits per token and the PPL bound.
    """
    was_training = denoiser.training
    denoiser.eval()
    generator = torch.Generator().manual_seed(seed)
    sampler = TimeSampler.from_config(cfg, evaluation=True)  # fixed proposal, independent masks
    # One row per sequence (no MIRROR or two-draw pairs: evaluation needs no score-function baseline).
    cfg = replace(cfg, velocity_weight=1.0, mask_pairs="independent", score_baseline="rloo",
                  t_sampler=sampler.t_sampler)
    if denoiser.causal:  # every slice of the order in one pass: each time sample gives the same exact value
        time_samples = 1
    total, count = 0.0, 0
    for batch in batches:
        x0, document_ids = (None if x is None else x.to(device) for x in split_document_ids(batch))
        tokens = x0.numel() if document_ids is None else int(document_masks(document_ids)[1].sum())
        if denoiser.config.pipeline_model_parallel_size > 1:  # the same noise, through the pipeline
            terms = pipeline_nelbo(denoiser, schedule, [x0] * time_samples, cfg, generator, sampler=sampler,
                                   forward_only=True, document_ids=[document_ids] * time_samples)
            stage_mean = last_stage_mean([x.nelbo.item() for x in terms], x0.device, denoiser.process_groups)
            total += stage_mean * tokens * time_samples
            count += tokens * time_samples
            continue
        for _ in range(time_samples):
            t, t_weight, uniforms = draw_noise(x0.shape[0], x0.shape[1], sampler, generator, x0.device)
            terms = nelbo(denoiser, schedule, x0, t, t_weight, uniforms, velocity_weight=1.0, score_function=False,
                          document_ids=document_ids, estimator=cfg.estimator)
            total += terms.per_sequence.sum().item()
            count += tokens
    denoiser.train(was_training)
    if count == 0:
        raise ValueError("evaluate_nelbo got no batches")
    return _summary(total, count)


def _ratio_stderr(total: float, count: float, batches: float, total_sq: float, total_count: float,
                  count_sq: float) -> float:
    """Standard error of the per-token NELBO r = sum_k S_k / sum_k n_k over independent batches k (S_k: summed
    NELBO of batch k, n_k: its token draws), by the delta method for a ratio:
    se^2 = sum_k (S_k - r n_k)^2 / (K (K - 1) nbar^2). The batches are independent draws of the held-out data and
    of the noise (each has its own seed), so this covers both; the antithetic times inside a batch stay inside
    S_k. nan with fewer than two batches."""
    if batches < 2:
        return float("nan")
    r = total / count
    residual = max(total_sq - 2 * r * total_count + r * r * count_sq, 0.0)
    return math.sqrt(residual / (batches * (batches - 1))) / (count / batches)


def _summary(total: float, count: int) -> dict[str, float]:
    value = total / count
    return {"nelbo": value, "bits_per_token": value / math.log(2), "ppl_bound": math.exp(min(value, 700.0)),
            "tokens": count}  # token x time-sample draws averaged over


@torch.no_grad()
def exact_ar_nll(denoiser: Denoiser, schedule: Schedule, x0: Tensor) -> Tensor:
    """[b] exact NLL (nats) of each sequence under a left-to-right / right-to-left schedule: one time in each
    position's slice (`grid_times`), which the Rao-Blackwellised estimator turns into the causal likelihood
    (tests/mdm_scale/test_objective.py::test_left_to_right_schedule_equals_causal_nll). l passes per sequence; one
    per batch for a causal denoiser (objective.causal)."""
    b, l = x0.shape
    if denoiser.causal:  # every slice in one pass (teacher forcing): the per-sequence sum of the causal NLLs
        ones = torch.ones(b, dtype=torch.float64, device=x0.device)
        return nelbo(denoiser, schedule, x0, ones, ones, torch.zeros(b, l, dtype=torch.float64, device=x0.device),
                     score_function=False).per_sequence.double()
    t, t_weight = grid_times(l)
    out = torch.zeros(b, dtype=torch.float64, device=x0.device)
    uniforms = torch.zeros(l, l, dtype=torch.float64, device=x0.device)  # unused by the deterministic order
    for i in range(b):
        terms = nelbo(denoiser, schedule, x0[i].expand(l, -1), t.to(x0.device), t_weight.to(x0.device), uniforms,
                      velocity_weight=1.0, score_function=False)
        out[i] = terms.per_sequence.double().mean()
    return out


def evaluate_checkpoint(checkpoint: str, *, split: str = "heldout", data_path: str | None = None,
                        time_samples: int = 16, max_batches: int | None = None, seed: int = 1234,
                        exact_ar: bool = True, estimator: str | None = None) -> dict[str, float]:
    """Held-out NELBO of a checkpoint over `split`, data-parallel over the launched ranks (see module doc).

    estimator: None = the run's own; "order" = the order form with t_min = 0, unbiased for any polynomial-family
    schedule (learned w < 1 lose a fraction t_min^w of their loss under the time form's truncation: 5b of
    docs/objective.md), "time" = the time form with the run's t_min."""
    cfg, tokenizer, model, dims = load_for_inference(checkpoint)
    denoiser, schedule = model["denoiser"], model["schedule"]
    objective = cfg.objective
    if estimator == "order":
        objective = order_form(objective)
    elif estimator is not None:
        objective = replace(objective, estimator=estimator)
    remote = None if data_path else (cfg.data.remote or None)
    if data_path:
        root = Path(data_path).expanduser()
    elif remote:
        root = remote_cache_root(remote, Path(cfg.data.cache_dir).expanduser())
    else:
        root = embedded_corpus_shards(cfg.data.source, tokenizer, cfg.data.seq_len,
                                      Path(cfg.data.cache_dir).expanduser())
    batches = open_split(root, split, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.micro_batch_size,
                         seed=0, shuffle=False, remote=remote)
    n = batches.batches_per_epoch if max_batches is None else min(max_batches, batches.batches_per_epoch)
    # Batch k goes to rank k mod world, with noise seeded by (seed, k): any rank count gives the same numbers.
    # NELBO x draws, token draws, exact AR NLL, tokens, then batch count and the second moments of the per-batch
    # (NELBO x draws, draws) pairs for the standard error.
    sums = torch.zeros(8, dtype=torch.float64)
    ar = exact_ar and isinstance(schedule, BlockSchedule) and schedule.block_size == 1
    for k in range(dims.rank, n, dims.world_size):
        batch = batches.batch_at(0, k * batches.batch_size * batches.world_size)
        metrics = evaluate_nelbo(denoiser, schedule, [batch], objective, time_samples=time_samples,
                                 seed=seed * 1_000_003 + k, device=dims.device)
        total, draws = metrics["nelbo"] * metrics["tokens"], metrics["tokens"]
        sums[0] += total
        sums[1] += draws
        sums[4:] += torch.tensor([1.0, total * total, total * draws, draws * draws], dtype=torch.float64)
        if ar:
            x0, document_ids = split_document_ids(batch)
            if document_ids is not None:
                raise ValueError("the exact AR NLL is for unpacked (wrap) data; pass --no-exact-ar")
            sums[2] += exact_ar_nll(denoiser, schedule, x0.to(dims.device)).sum().item()
            sums[3] += x0.numel()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    out = _summary(sums[0].item(), int(sums[1].item()))
    out["batches"] = n
    out["nelbo_stderr"] = _ratio_stderr(*sums[[0, 1, 4, 5, 6, 7]].tolist())
    if ar:
        out["exact_nll"] = sums[2].item() / sums[3].item()
    return out


@expected_errors
def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    p = argparse.ArgumentParser(prog="python -m mdm_scale.evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="runs/<name>/checkpoints/step_N (its run's config.yaml is read)")
    p.add_argument("--split", default="heldout", choices=("train", "heldout"))
    p.add_argument("--data-path", default=None, help="another preprocessed corpus (zero-shot); default: the run's")
    p.add_argument("--time-samples", type=int, default=16, help="antithetic times per batch")
    p.add_argument("--batches", default="all", help="how many batches of the split ('all' = one full pass)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-exact-ar", action="store_true", help="skip the exact NLL of autoregressive checkpoints")
    p.add_argument("--estimator", default=None, choices=("time", "order"),
                   help="default: the run's; order = the order form at t_min 0 (unbiased for polynomial-family "
                        "schedules, learned ones included)")
    args = p.parse_args(argv)
    out = evaluate_checkpoint(args.checkpoint, split=args.split, data_path=args.data_path,
                              time_samples=args.time_samples, seed=args.seed, exact_ar=not args.no_exact_ar,
                              max_batches=None if args.batches == "all" else int(args.batches),
                              estimator=args.estimator)
    if int(os.environ.get("RANK", "0")) == 0:
        line = (f"{args.split}: NELBO {out['nelbo']:.4f} +- {out['nelbo_stderr']:.4f} (stderr) nats/token, "
                f"{out['bits_per_token']:.4f} bits/token, "
                f"PPL <= {out['ppl_bound']:.2f} ({out['batches']} batches, {args.time_samples} times each)")
        if "exact_nll" in out:
            line += f"; exact AR NLL {out['exact_nll']:.4f} nats/token"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
