"""Variance of the NELBO estimator and of its gradient under each time / mask sampler, at fixed parameters.

    scripts/in_venv.sh python bench/variance.py                       # mdlm and mdm_ls, initial + trained tiny
    scripts/in_venv.sh python bench/variance.py --draws 64 --train-steps 50 --objectives mdlm   # quick look

For each objective the `tiny` model is trained once (`--train-steps`, cached under --out) and measured at its
initial and its trained parameters, with **equal tokens per draw**: `batch` rows, i.e. `batch` sequences for the
independent estimators and `batch / 2` sequences x 2 for MIRROR and two_draw (a pair is two rows). Two data
settings:

* `fixed`: every draw sees the same held-out batch; only t and the masks vary (the noise these methods target).
* `resampled`: every draw takes a fresh random batch of held-out sequences, so data noise is included as in
  training; MIRROR then sees half as many distinct sequences per draw, which it pays for.
* `within`: both draws of a pair share one batch, a fresh one per pair: E_x Var(g | x), the t and mask noise
  averaged over batches (`fixed` measures it on one batch only). `resampled` minus `within` is the data noise
  Var_x E[g | x], which no time / mask sampler can remove; at equal tokens MIRROR doubles it (half the sequences),
  so MIRROR's ratio to uniform is at least 2 x (data share of uniform's variance).

Draws are paired across estimators (the same data at draw k). P-POTS's proposal is first fitted on `--warmup`
draws at the same parameters (forward only) and then frozen.

Every row uses the RLOO score-function baseline except `two_draw` (the LoMDM paper's Eq. 8: each sequence twice
at one antithetic t with independent masks, the partner's loss as baseline; learned schedules only, skipped for
the others). The `schedule params' share` column is the learned schedule's part of the gradient variance, i.e.
the score-function term's (plus the small pathwise part).

Total gradient variance = trace of the covariance of the flattened gradient of the per-token loss. Both it and
the loss variance are estimated from independent pairs of draws, tr Cov = E ||g - g'||^2 / 2 (unbiased, no need
to hold all gradients), with a 95% t-interval over pairs; ratios to `uniform` carry a delta-method interval.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

ESTIMATORS = {  # name -> (t_sampler, mask_pairs, p_pots_statistic, score_baseline)
    "uniform": ("uniform", "independent", "sequence", "rloo"),
    "antithetic": ("antithetic", "independent", "sequence", "rloo"),
    "mirror": ("antithetic", "mirror", "sequence", "rloo"),
    "p_pots": ("p_pots", "independent", "sequence", "rloo"),
    "mirror+p_pots": ("p_pots", "mirror", "sequence", "rloo"),
    "p_pots:token": ("p_pots", "independent", "token", "rloo"),
    "mirror+p_pots:token": ("p_pots", "mirror", "token", "rloo"),
    "two_draw": ("antithetic", "independent", "sequence", "two_draw"),
}
DEFAULT_ESTIMATORS = ["uniform", "antithetic", "mirror", "p_pots", "mirror+p_pots", "two_draw"]
T_95 = 1.96  # normal quantile; pairs >= 32 keep the t quantile within 4% of it


def base_overrides(objective: str, args) -> list[str]:
    return [f"objective={objective}", f"run_dir={Path(args.out) / objective}", "logging.wandb=false",
            "logging.progress=false", f"train.steps={args.train_steps}", "train.eval_every=0",
            "sampling.num_samples=0", f"data.seq_len={args.seq_len}", f"data.cache_dir={args.cache_dir}"]


def trained_checkpoint(objective: str, args) -> Path:
    """Train the tiny model once (or reuse the run in --out) and return its final checkpoint."""
    from mdm_scale.config import load_config
    from mdm_scale.train import train

    cfg = load_config("tiny", base_overrides(objective, args))
    final = Path(cfg.run_dir) / "checkpoints" / f"step_{args.train_steps:08d}"
    if not final.exists():
        print(f"training {objective} tiny for {args.train_steps} steps -> {cfg.run_dir}", flush=True)
        start = time.perf_counter()
        train(cfg)
        print(f"  trained in {time.perf_counter() - start:.0f} s", flush=True)
    return final


def models(objective: str, args):
    """(label, cfg, model) at the initial and at the trained parameters."""
    from mdm_scale.model import load_for_inference
    from mdm_scale.model import build_model

    cfg, tokenizer, trained, dims = load_for_inference(trained_checkpoint(objective, args))
    torch.manual_seed(cfg.train.seed)  # the initialisation train() starts from
    initial = build_model(cfg, tokenizer.vocab_size, dims)
    return tokenizer, [("initial", cfg, initial), (f"trained {args.train_steps} steps", cfg, trained)]


def heldout_pool(cfg, tokenizer, size: int) -> torch.Tensor:
    from data_pipeline.datasets import embedded_corpus_shards, open_split

    root = embedded_corpus_shards(cfg.data.source, tokenizer, cfg.data.seq_len, Path(cfg.data.cache_dir))
    split = open_split(root, "heldout", tokenizer, seq_len=cfg.data.seq_len, batch_size=64, seed=0)
    rows, out = 0, []
    for batch in split:
        out.append(batch)
        rows += len(batch)
        if rows >= size or rows >= split.batches_per_epoch * 64:
            break
    return torch.cat(out)[:size]


def draw(model, cfg, sampler, x0: torch.Tensor, seed: int, with_grad: bool):
    """(per-token loss, flattened gradient or None, terms) of one estimate."""
    from mdm_scale.objective import training_nelbo

    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    if not with_grad:
        with torch.no_grad():
            terms = training_nelbo(model["denoiser"], model["schedule"], x0, cfg, generator, sampler=sampler)
        return terms.nelbo.item(), None, terms
    terms = training_nelbo(model["denoiser"], model["schedule"], x0, cfg, generator, sampler=sampler)
    grads = torch.autograd.grad(terms.loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                      for g, p in zip(grads, params)])
    return terms.nelbo.item(), flat, terms


def schedule_coordinates(model) -> torch.Tensor:
    """Bool mask over the flattened gradient of `draw`: True at the learned schedule's parameters (MDM-LS
    position logits, LoMDM scheduler heads), whose gradient is the score-function term's."""
    from mdm_scale.schedules import is_schedule_parameter

    return torch.cat([torch.full((p.numel(),), is_schedule_parameter(name))
                      for name, p in model.named_parameters() if p.requires_grad])


def pair_estimate(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width of per-pair unbiased variance estimates."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    return mean, T_95 * sd / math.sqrt(n)


def measure(model, cfg, pool: torch.Tensor, args, estimator: str, data_mode: str) -> dict:
    from mdm_scale.time_sampling import TimeSampler

    t_sampler, mask_pairs, statistic, score_baseline = ESTIMATORS[estimator]
    ocfg = replace(cfg.objective, t_sampler=t_sampler, mask_pairs=mask_pairs, p_pots_statistic=statistic,
                   score_baseline=score_baseline)
    sampler = TimeSampler.from_config(ocfg)
    paired = mask_pairs == "mirror" or score_baseline == "two_draw"  # a pair is two rows
    sequences = args.batch // 2 if paired else args.batch
    data = torch.Generator().manual_seed(1234)  # the same batches for every estimator (paired)

    current = None

    def batch(k: int = 0):
        nonlocal current
        if data_mode == "fixed":
            return pool[:sequences]
        if data_mode == "within" and k % 2 == 1:  # the second draw of a pair reuses the first's batch
            return current
        current = pool[torch.randint(0, len(pool), (sequences,), generator=data)]
        return current

    if t_sampler == "p_pots":  # fit the proposal at these parameters, then freeze it
        for k in range(args.warmup):
            _, _, terms = draw(model, ocfg, sampler, batch(), seed=10_000 + k, with_grad=False)
            sampler.observe(terms.t, terms.per_sequence, terms.t_weight, terms.token_square)
        data = torch.Generator().manual_seed(1234)
    schedule_part = schedule_coordinates(model)
    loss_pairs, grad_pairs, schedule_pairs, previous = [], [], [], None
    for k in range(args.draws):
        loss, grad, _ = draw(model, ocfg, sampler, batch(k), seed=k, with_grad=True)
        if previous is None:
            previous = (loss, grad)
            continue
        loss_pairs.append((loss - previous[0]) ** 2 / 2)
        difference = grad - previous[1]
        grad_pairs.append(difference.square().sum().item() / 2)
        schedule_pairs.append(difference[schedule_part].square().sum().item() / 2)
        previous = None
    return {"loss_var": pair_estimate(loss_pairs), "grad_var": pair_estimate(grad_pairs),
            "schedule_grad_var": pair_estimate(schedule_pairs),
            "proposal": sampler.proposal().tolist() if t_sampler == "p_pots" else None}


def ratio(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """a / b with a delta-method 95% half-width (independent-estimate approximation)."""
    r = a[0] / b[0]
    return r, r * math.sqrt((a[1] / a[0]) ** 2 + (b[1] / b[0]) ** 2)


def main(argv: list[str] | None = None) -> int:
    from mdm_scale.config import LEARNED_KINDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", nargs="+", default=["mdlm", "mdm_ls"])
    p.add_argument("--estimators", nargs="+", default=DEFAULT_ESTIMATORS, choices=list(ESTIMATORS),
                   help="':token' = P-POTS fitted to the per-token second moment (objective.p_pots_statistic)")
    p.add_argument("--data", nargs="+", default=["fixed", "resampled"], choices=["fixed", "resampled", "within"])
    p.add_argument("--at", nargs="+", default=["initial", "trained"], choices=["initial", "trained"],
                   help="which parameters to measure at")
    p.add_argument("--draws", type=int, default=64, help="gradient draws per estimator (pairs = draws / 2)")
    p.add_argument("--warmup", type=int, default=64, help="forward-only draws that fit P-POTS's proposal")
    p.add_argument("--batch", type=int, default=8, help="rows per draw (equal tokens for every estimator)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--pool", type=int, default=1024, help="held-out sequences the batches are drawn from")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench_variance")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/mdm_scale"))
    p.add_argument("--json", default=None, help="also write every number here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch % 2 or args.draws < 8:
        p.error("--batch must be even (MIRROR pairs) and --draws >= 8")
    start = time.perf_counter()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    print(f"{args.draws} draws ({args.draws // 2} pairs) x {args.batch} rows x {args.seq_len} tokens per "
          f"estimator; P-POTS warm-up {args.warmup} draws")
    report = {"args": vars(args), "results": {}}
    for objective in args.objectives:
        tokenizer, checkpoints = models(objective, args)
        pool = heldout_pool(checkpoints[0][1], tokenizer, args.pool)
        checkpoints = [c for c in checkpoints if c[0].split()[0] in args.at]
        for (label, cfg, model), data_mode in itertools.product(checkpoints, args.data):
            model.train()  # as in training (tiny has no dropout)
            results = {}
            learned = cfg.objective.schedule.kind in LEARNED_KINDS
            for estimator in args.estimators:
                if ESTIMATORS[estimator][3] == "two_draw" and not learned:
                    continue  # a score-function baseline: nothing to estimate without a learned schedule
                t0 = time.perf_counter()
                results[estimator] = measure(model, cfg, pool, args, estimator, data_mode)
                results[estimator]["seconds"] = time.perf_counter() - t0
            report["results"][f"{objective} / {label} / {data_mode} data"] = results
            print(f"\n{objective}, {label}, {data_mode} data  (ratios to uniform, 95% intervals)")
            print("| estimator | loss variance | ratio | grad variance (trace) | ratio | schedule params' share | s |")
            print("|---|---|---|---|---|---|---|")
            for name, r in results.items():
                lr = ratio(r["loss_var"], results["uniform"]["loss_var"]) if "uniform" in results else (1, 0)
                gr = ratio(r["grad_var"], results["uniform"]["grad_var"]) if "uniform" in results else (1, 0)
                print(f"| {name} | {r['loss_var'][0]:.4g} +- {r['loss_var'][1]:.2g} | {lr[0]:.3f} +- {lr[1]:.3f} "
                      f"| {r['grad_var'][0]:.4g} +- {r['grad_var'][1]:.2g} | {gr[0]:.3f} +- {gr[1]:.3f} "
                      f"| {r['schedule_grad_var'][0] / r['grad_var'][0]:.2f} | {r['seconds']:.0f} |", flush=True)
    report["wall_seconds"] = time.perf_counter() - start
    print(f"\nwall time {report['wall_seconds']:.0f} s; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
