"""Tune the Beta(a, b) time grid of the sampler for one NFE by generation NLL under an autoregressive scorer.

    python -m mdm_scale tune-schedule runs/tiny/checkpoints/step_00000600 --nfe 8 \\
        --scorer runs/tiny_ar/checkpoints/step_00000600 [--grid 0.5,1,2,4] [--num-samples 16]

Every (a, b) of the coarse grid (a, b in --grid) generates the same number of samples from the same seed (common
random numbers), which the scorer (a checkpoint of an `objective=ar` run of this project, same tokenizer) scores
by its exact causal NLL per token; then a finer grid, a and b times {2^-1/2, 1, 2^1/2} around the best, unless
--no-refine. The table is printed and the best (lowest NLL) is written to CKPT/tuned_schedule.json
({"nfe", "beta": [a, b], "score": NLL, "scorer", ...}), which `python -m mdm_scale sample CKPT` then uses for that
NFE when --beta is not given.

A scorer is required: the sampled model cannot grade its own samples without a reference (its NELBO of its own
samples rewards whatever it already prefers). Generation NLL alone also rewards repetitive, low-entropy text; the
table shows the mean token entropy of the samples next to it, check it did not collapse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mdm_scale.cli import expected_errors
from mdm_scale.model import load_for_inference
from mdm_scale.sampling import (POLICIES, TUNED_FILE, ArScorer, generate, generation_nll, load_scorer,
                                token_entropy)

COARSE_GRID = (0.5, 1.0, 2.0, 4.0)


def score_beta(denoiser, schedule, scorer: ArScorer, beta: tuple[float, float], *, nfe: int, num_samples: int,
               seq_len: int, seed: int = 0, device="cpu", tokenizer=None, **sampler) -> dict:
    """One table row: samples with the Beta(a, b) grid (generator seeded with `seed`), their NLL / PPL under the
    scorer, token entropy and the denoiser calls made."""
    out = generate(denoiser, schedule, num_samples=num_samples, seq_len=seq_len, nfe=nfe,
                   generator=torch.Generator().manual_seed(seed), device=device, beta=beta, **sampler)
    score = generation_nll(out.tokens, scorer, tokenizer)
    return {"beta": [float(beta[0]), float(beta[1])], "nll": score["nll"], "ppl": score["ppl"],
            "entropy": token_entropy(out.tokens), "nfe": out.nfe}


def finer_grid(best: tuple[float, float], factor: float = math.sqrt(2.0)) -> list[tuple[float, float]]:
    """(a f^i, b f^j) for i, j in {-1, 0, 1}: the 3 x 3 neighbourhood of `best` on a log scale."""
    return [(round(best[0] * factor ** i, 6), round(best[1] * factor ** j, 6)) for i in (-1, 0, 1) for j in (-1, 0, 1)]


def tune_beta(denoiser, schedule, scorer: ArScorer, *, nfe: int, grid: Sequence[float] = COARSE_GRID,
              refine: bool = True, num_samples: int = 8, seq_len: int = 64, seed: int = 0, device="cpu",
              tokenizer=None, log: Callable[[str], None] = print, **sampler) -> dict:
    """Search (a, b) over grid x grid (then `finer_grid` of the best when `refine`); returns {"best": row,
    "rows": all rows in order}. `sampler`: further `generate` options (policy, temperature, top_p, remask_rate)."""
    if sampler.get("policy", "ancestral") == "eb":
        raise ValueError("the eb policy does not use the time grid; tune another policy")
    rows, seen = [], set()

    def run(candidates):
        for beta in candidates:
            key = (round(beta[0], 6), round(beta[1], 6))
            if key in seen or min(key) <= 0:
                continue
            seen.add(key)
            row = score_beta(denoiser, schedule, scorer, key, nfe=nfe, num_samples=num_samples, seq_len=seq_len,
                             seed=seed, device=device, tokenizer=tokenizer, **sampler)
            rows.append(row)
            log(f"{key[0]:>8g} {key[1]:>8g} {row['nll']:>10.4f} {row['ppl']:>10.2f} {row['entropy']:>9.3f}")

    log(f"{'a':>8} {'b':>8} {'NLL':>10} {'PPL':>10} {'entropy':>9}   (NFE {nfe}, {num_samples} x {seq_len} samples)")
    run([(float(a), float(b)) for a in grid for b in grid])
    if refine:
        best = min(rows, key=lambda r: r["nll"])
        run(finer_grid(tuple(best["beta"])))
    return {"best": min(rows, key=lambda r: r["nll"]), "rows": rows}


@expected_errors
def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mdm_scale tune-schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the masked diffusion checkpoint to sample from")
    p.add_argument("--nfe", type=int, required=True, help="denoiser calls the grid is tuned for")
    p.add_argument("--scorer", required=True, help="checkpoint of an objective=ar run (same tokenizer)")
    p.add_argument("--grid", default=",".join(f"{v:g}" for v in COARSE_GRID),
                   help="comma-separated values tried for both a and b (coarse grid)")
    p.add_argument("--no-refine", action="store_true", help="skip the finer 3 x 3 grid around the best")
    p.add_argument("--num-samples", type=int, default=8, help="samples per (a, b)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's sampling.seq_len")
    p.add_argument("--seed", type=int, default=0, help="the same seed for every (a, b)")
    p.add_argument("--policy", default="ancestral", choices=[x for x in POLICIES if x != "eb"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--out", default=None, help=f"where to write the result (default: CKPT/{TUNED_FILE})")
    args = p.parse_args(argv)
    grid = [float(v) for v in args.grid.split(",") if v.strip()]
    cfg, tokenizer, model, dims = load_for_inference(args.checkpoint)
    scorer = load_scorer(args.scorer)
    seq_len = args.seq_len or min(cfg.sampling.seq_len, cfg.data.seq_len)
    result = tune_beta(model["denoiser"], model["schedule"], scorer, nfe=args.nfe, grid=grid,
                       refine=not args.no_refine, num_samples=args.num_samples, seq_len=seq_len, seed=args.seed,
                       device=dims.device, tokenizer=tokenizer, policy=args.policy, temperature=args.temperature,
                       top_p=args.top_p)
    best = result["best"]
    record = {"nfe": args.nfe, "beta": best["beta"], "score": best["nll"], "scorer": str(args.scorer),
              "metric": "generation NLL (nats/token) under the scorer", "ppl": best["ppl"],
              "entropy": best["entropy"], "policy": args.policy, "num_samples": args.num_samples,
              "seq_len": seq_len, "seed": args.seed, "temperature": args.temperature, "top_p": args.top_p,
              "table": result["rows"]}
    out = Path(args.out) if args.out else Path(args.checkpoint) / TUNED_FILE
    out.write_text(json.dumps(record, indent=1))
    print(f"best Beta({best['beta'][0]:g}, {best['beta'][1]:g}) for NFE {args.nfe}: NLL {best['nll']:.4f}, "
          f"PPL {best['ppl']:.2f} -> {out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
