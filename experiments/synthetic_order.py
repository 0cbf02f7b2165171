"""Synthetic order experiment: a task where right-to-left generation is clearly the best order.

Data. Sequences of length L over V symbols (byte ids 'a', 'b', ...). The last token is uniform; every other token
is a deterministic function of its right neighbour, x_i = f(x_{i+1}), where f is a fixed random *many-to-one* map
(each of V/2 image symbols has exactly 2 preimages, plus with probability `noise` a token is resampled uniformly,
which keeps the left end of the sequence from collapsing onto f's cycles).

Why many-to-one and not a permutation: with a permutation, x_{i+1} = f^{-1}(x_i) is just as deterministic, so
left-to-right would be exactly as easy as right-to-left and no order would be uniquely best. With a 2-to-1 map,
right-to-left needs one lookup per token (p(x_i | x_{i+1}) is a point mass, up to the noise), while left-to-right
has to infer which of the preimages came next (a posterior that depends on the position), and a random order has
to compose f over gaps (x_i = f^k(x_{i+k})) or invert it. Note that an exact model reaches the same NELBO, -log p(x),
under every order (chain rule): any gap between objectives is about what a small network learns in a fixed budget,
exactly the effect learned orders exploit (Garg et al. 2025).

Runs. For each objective (mdlm, mdm_ls, lomdm; optionally the fixed references right_to_left and ar) and seed, one
tiny denoiser is trained in-process with `mdm_scale.train.train`. Reported: the held-out NELBO (per token, nats) at
the end, mean and std over seeds, the margin of each learned schedule below MDLM against the seed noise, and the
learned order.

Order convention (docs/objective.md, MISSION.md): alpha_i(t) = 1 - t^{w_i}, reveal time tau_i ~ Beta(w_i, 1),
E[tau_i] = w_i / (w_i + 1). Generation runs from t = 1 down to 0, so LARGER w_i = revealed EARLIER. Right-to-left
therefore means w_i increasing with position i: Spearman(position, w) = +1 (and the mean generation step, sampled
by ordering positions by decreasing tau, decreases with position).

    scripts/in_venv.sh python experiments/synthetic_order.py --seeds 0 1 2 --out runs/synthetic_order
    scripts/in_venv.sh python experiments/synthetic_order.py --quick --out /tmp/so    # seconds, for the test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OBJECTIVES = ("mdlm", "mdm_ls", "lomdm")
REFERENCES = ("right_to_left", "ar")
CONTROLS = ("mdlm_is",)
"""mdlm_is: MDLM's schedule trained and evaluated with the learned presets' time sampler (time_power 0.2 importance
sampling, t_min 0): separates the effect of the time sampler from that of a learned order."""
LEARNED = ("mdm_ls", "lomdm")
FIRST_SYMBOL = ord("a")  # byte ids of the V symbols: 'a', 'b', ...


# ----------------------------------------------------------------------------------------------------- data
def make_map(num_symbols: int, seed: int) -> np.ndarray:
    """A fixed random 2-to-1 map f: [V] -> [V] (V even): V/2 image symbols with exactly two preimages each."""
    if num_symbols % 2:
        raise ValueError("num_symbols must be even for a 2-to-1 map")
    rng = np.random.default_rng(seed)
    image = rng.choice(num_symbols, size=num_symbols // 2, replace=False)
    return rng.permutation(np.repeat(image, 2)).astype(np.int64)


def generate(num: int, seq_len: int, f: np.ndarray, *, noise: float, rng: np.random.Generator) -> np.ndarray:
    """[num, seq_len] symbol indices in [0, V): x_L uniform, x_i = f(x_{i+1}) (w.p. 1 - noise, else uniform)."""
    v = len(f)
    x = np.empty((num, seq_len), dtype=np.int64)
    x[:, -1] = rng.integers(0, v, size=num)
    for i in range(seq_len - 2, -1, -1):
        x[:, i] = f[x[:, i + 1]]
        resample = rng.random(num) < noise
        x[resample, i] = rng.integers(0, v, size=int(resample.sum()))
    return x


def true_nll_per_token(f: np.ndarray, seq_len: int, noise: float) -> float:
    """Exact entropy rate of the generator, nats per token: log V for x_L, then H(x_i | x_{i+1}) per token.

    This is the NELBO an exact model reaches under any order (the floor every objective approaches)."""
    v = len(f)
    p_hit = (1 - noise) + noise / v
    h_step = -(p_hit * math.log(p_hit)) - ((v - 1) * (noise / v) * math.log(noise / v) if noise > 0 else 0.0)
    return (math.log(v) + (seq_len - 1) * h_step) / seq_len


def exact_nll_per_token(x: np.ndarray, f: np.ndarray, noise: float) -> float:
    """Mean -log p(x) / L under the true generator for [n, L] symbol indices: the exact model's NELBO on exactly
    these sequences (the held-out split's own floor, which differs from the entropy rate by sampling noise)."""
    v = len(f)
    hit = x[:, :-1] == f[x[:, 1:]]
    p = np.where(hit, (1 - noise) + noise / v, noise / v)
    return float((math.log(v) - np.log(p).sum(1)).mean() / x.shape[1])


def write_dataset(root: Path, *, seq_len: int, num_symbols: int, noise: float, num_train: int, num_heldout: int,
                  data_seed: int = 1234) -> dict:
    """Train/heldout MDS shards with the byte tokenizer's fingerprint under root/{train,heldout}."""
    from data_pipeline.shards import write_mds
    from data_pipeline.tokenizer import load_tokenizer

    f = make_map(num_symbols, data_seed)
    rng = np.random.default_rng(data_seed + 1)
    fingerprint = load_tokenizer("byte").fingerprint()
    floors = {}
    for split, n in (("train", num_train), ("heldout", num_heldout)):
        x = generate(n, seq_len, f, noise=noise, rng=rng)
        floors[split] = exact_nll_per_token(x, f, noise)
        write_mds((x + FIRST_SYMBOL).astype(np.uint32), root / split, tokenizer_fingerprint=fingerprint,
                  overwrite=True)
    return {"heldout_exact_nll_per_token": floors["heldout"],"map": f.tolist(), "seq_len": seq_len, "num_symbols": num_symbols, "noise": noise,
            "num_train": num_train, "num_heldout": num_heldout,
            "true_nll_per_token": true_nll_per_token(f, seq_len, noise)}


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    seq_len: int = 16
    num_symbols: int = 16
    noise: float = 0.02
    num_train: int = 20000
    num_heldout: int = 512
    steps: int = 300
    eval_every: int = 100
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 20
    eval_batches: int = 16
    eval_time_samples: int = 4
    schedule_lr_mult: float = 10.0
    """Learning-rate multiplier for the schedule parameters only (MDM-LS position logits, LoMDM scheduler heads);
    1 = the library default (one learning rate for everything)."""
    exponent_range: float = 1.5
    """c2 of w = c1 + c2 NormSig(.) (the presets' 1.5 bounds w to [0.25, 1.75])."""

    @classmethod
    def quick(cls) -> "Settings":
        return cls(seq_len=8, num_train=512, num_heldout=64, steps=6, eval_every=3, layers=1, hidden=32, heads=2,
                   batch=8, eval_batches=2, eval_time_samples=1, warmup=2)


def objective_overrides(objective: str) -> list[str]:
    if objective == "mdlm_is":
        return ["objective=mdlm", "objective.time_power=0.2", "objective.t_min=0.0"]
    if objective == "right_to_left":
        return ["objective=ar", "objective.schedule.kind=right_to_left"]
    return [f"objective={objective}"]


def run_config(objective: str, seed: int, data_dir: Path, run_dir: Path, s: Settings):
    from mdm_scale.config import load_config

    return load_config("tiny", [
        *objective_overrides(objective),
        f"data.path={data_dir}", "data.tokenizer=byte", f"data.seq_len={s.seq_len}", f"data.micro_batch_size={s.batch}",
        f"model.num_layers={s.layers}", f"model.hidden_size={s.hidden}", f"model.num_attention_heads={s.heads}",
        f"model.scheduler_head_size={s.hidden}", f"optimizer.lr={s.lr}", f"optimizer.warmup_steps={s.warmup}",
        "logging.wandb=false", "logging.progress=false", f"logging.log_every={max(1, s.steps)}",
        "sampling.num_samples=0", f"train.steps={s.steps}", f"train.eval_every={s.eval_every}",
        f"train.eval_batches={s.eval_batches}", f"train.eval_time_samples={s.eval_time_samples}",
        f"train.seed={seed}", "train.device=cpu", "checkpoint.resume=false", f"run_dir={run_dir}",
        f"name=synthetic-{objective}-s{seed}",
        *([f"objective.schedule.exponent_range={s.exponent_range}"] if objective in LEARNED else []),
    ])


def _is_schedule_param(name: str) -> bool:
    return name.startswith("schedule.") or ".scheduler_heads." in name


def patched_engine_builder(schedule_lr_mult: float):
    """mdm_scale.train.build_training_engine with a second AdamW parameter group for the schedule parameters at
    `schedule_lr_mult` x lr (same warm-up/cosine multiplier; LambdaLR scales each group's own base lr)."""
    import torch

    from mdm_scale.train import warmup_cosine
    from parallel.engine import build_engine

    def build(model, cfg, dims):
        opt = cfg.optimizer
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if not _is_schedule_param(n)], "lr": opt.lr},
                  {"params": [p for n, p in named if _is_schedule_param(n)], "lr": opt.lr * schedule_lr_mult}]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                      weight_decay=opt.weight_decay)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda st: warmup_cosine(st, warmup=opt.warmup_steps, total=cfg.train.steps,
                                                min_ratio=opt.min_lr_ratio))
        return build_engine(model, optimizer, lr_schedule, zero_stage=cfg.parallel.zero_stage,
                            grad_clip=opt.grad_clip, grad_accumulation=cfg.data.grad_accumulation,
                            micro_batch_size=cfg.data.micro_batch_size, pipeline_parallel=dims.pipeline_parallel)

    return build


# ------------------------------------------------------------------------------------------------- the order
def learned_exponents(cfg, checkpoint_dir: Path, heldout: np.ndarray) -> np.ndarray | None:
    """Mean learned exponents w_i [L] of a trained run (None for fixed schedules).

    MDM-LS: the per-position exponents. LoMDM: the forward scheduler's w_i(x) averaged over the held-out
    sequences (clean-x features through the denoiser, then the head, as in training)."""
    import torch

    from data_pipeline.tokenizer import load_tokenizer
    from mdm_scale.train import build_model
    from parallel.checkpoint import latest_checkpoint
    from parallel.consolidate import model_layout, to_local
    from parallel.distributed import init_distributed
    from parallel.engine import safe_checkpoint_globals

    if cfg.objective.schedule.kind not in ("mdm_ls", "lomdm"):
        return None
    dims = init_distributed(device="cpu", seed=cfg.train.seed)
    model = build_model(cfg, load_tokenizer("byte").vocab_size, dims)
    ckpt = latest_checkpoint(checkpoint_dir, "tp0-pp0-dp0", safe_globals=safe_checkpoint_globals())
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    model.load_state_dict(to_local(ckpt.model, model_layout(model)))
    model.eval()
    denoiser, schedule = model["denoiser"], model["schedule"]
    with torch.no_grad():
        if cfg.objective.schedule.kind == "mdm_ls":
            return schedule.exponents(cfg.data.seq_len).double().numpy()
        x0 = torch.as_tensor(heldout.astype(np.int64))
        hidden = denoiser(x0, torch.zeros(x0.shape[0]))
        w = schedule.exponents(denoiser.scheduler_logits("forward_scheduler", hidden))
        return w.double().mean(0).numpy()


def rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    a = np.asarray(a, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=float)
    for value in np.unique(a):
        tie = a == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a, b) -> float:
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def generation_order_stats(w: np.ndarray, samples: int = 20000, seed: int = 0) -> dict:
    """Monte-Carlo over the order distribution the exponents define: tau_i = u_i^{1/w_i}, generated by
    decreasing tau. Returns the mean generation step per position (0 = first generated) and the probability that
    a position is generated before its left neighbour (i.e. each adjacent pair right-to-left)."""
    rng = np.random.default_rng(seed)
    tau = rng.random((samples, len(w))) ** (1.0 / np.asarray(w)[None, :])
    step = np.argsort(np.argsort(-tau, axis=1), axis=1)  # generation step of each position
    right_first = (step[:, 1:] < step[:, :-1]).mean()
    return {"mean_generation_step": step.mean(0).tolist(), "p_right_neighbour_first": float(right_first),
            "p_exact_right_to_left": float((np.diff(step, axis=1) == -1).all(axis=1).mean())}


# ---------------------------------------------------------------------------------------------------- runs
def run_one(objective: str, seed: int, data_dir: Path, out: Path, s: Settings, heldout: np.ndarray) -> dict:
    import mdm_scale.train as trainer

    run_dir = out / "runs" / f"{objective}-s{seed}"
    cfg = run_config(objective, seed, data_dir, run_dir, s)
    original = trainer.build_training_engine
    if s.schedule_lr_mult != 1.0 and objective in LEARNED:
        trainer.build_training_engine = patched_engine_builder(s.schedule_lr_mult)
    start = time.time()
    try:
        result = trainer.train(cfg)
    finally:
        trainer.build_training_engine = original
    wall = time.time() - start
    record = {"objective": objective, "seed": seed, "wall_s": wall,
              "final_nelbo": result.evals[max(result.evals)], "evals": {str(k): v for k, v in result.evals.items()},
              "losses": {str(k): v for k, v in result.losses.items()}}
    w = learned_exponents(cfg, run_dir / "checkpoints", heldout)
    if w is not None:
        positions = np.arange(len(w))
        record["exponents"] = w.tolist()
        record["mean_reveal_time"] = (w / (w + 1)).tolist()
        record["spearman_position_w"] = spearman(positions, w)
        record.update(generation_order_stats(w, seed=seed))
    print(f"[synthetic_order] {objective} seed {seed}: final held-out NELBO {record['final_nelbo']:.4f} "
          f"({wall:.0f} s)" + (f", Spearman(position, w) {record['spearman_position_w']:+.3f}" if w is not None
                                else ""), flush=True)
    return record


def summarise(records: list[dict], objectives: list[str]) -> dict:
    summary = {}
    for obj in objectives:
        vals = np.array([r["final_nelbo"] for r in records if r["objective"] == obj])
        entry = {"nelbo": vals.tolist(), "mean": float(vals.mean()),
                 "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        spear = [r["spearman_position_w"] for r in records if r["objective"] == obj and "spearman_position_w" in r]
        if spear:
            entry["spearman_position_w"] = spear
            entry["spearman_mean"] = float(np.mean(spear))
            entry["p_right_neighbour_first"] = [r["p_right_neighbour_first"] for r in records
                                                if r["objective"] == obj]
        summary[obj] = entry
    if "mdlm" in summary:
        base = summary["mdlm"]
        for obj in LEARNED:
            if obj not in summary:
                continue
            e = summary[obj]
            margin = base["mean"] - e["mean"]
            noise = max(base["std"], e["std"])
            # Paired by seed (same data order and noise seed) when both have the same seeds.
            diffs = np.array(base["nelbo"]) - np.array(e["nelbo"]) if len(base["nelbo"]) == len(e["nelbo"]) else None
            e["margin_below_mdlm"] = margin
            e["seed_noise"] = noise
            e["beats_mdlm_beyond_noise"] = bool(margin > noise and (diffs is None or (diffs > 0).all()))
            if diffs is not None:
                e["paired_differences"] = diffs.tolist()
    return summary


def plot(records: list[dict], objectives: list[str], out_dir: Path, prefix: str = "synthetic_order") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    learned = [o for o in objectives if o in LEARNED]
    if learned:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        colors = {"mdm_ls": "tab:blue", "lomdm": "tab:red"}
        for obj in learned:
            for r in (r for r in records if r["objective"] == obj):
                pos = np.arange(1, len(r["exponents"]) + 1)
                label = f"{obj} (seed {r['seed']}, rho={r['spearman_position_w']:+.2f})"
                axes[0].plot(pos, r["exponents"], "o-", color=colors[obj], alpha=0.4 + 0.2 * (r["seed"] % 3),
                             label=label, ms=3)
                axes[1].plot(pos, r["mean_generation_step"], "o-", color=colors[obj],
                             alpha=0.4 + 0.2 * (r["seed"] % 3), ms=3)
        n = len(next(r["exponents"] for r in records if "exponents" in r))
        pos = np.arange(1, n + 1)
        axes[0].axhline(1.0, color="gray", ls=":", label="MDLM (w = 1)")
        axes[0].set(xlabel="position i", ylabel="learned exponent w_i (larger = generated earlier)",
                    title="Learned exponents (LoMDM: mean over held-out x)")
        axes[0].legend(fontsize=6)
        axes[1].plot(pos, n - pos, "k--", label="exact right-to-left")
        axes[1].axhline((n - 1) / 2, color="gray", ls=":", label="MDLM (uniform order)")
        axes[1].set(xlabel="position i", ylabel="mean generation step (0 = first)",
                    title="Implied order (Monte-Carlo over tau)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{prefix}_learned_order.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = {"mdlm": "tab:gray", "mdlm_is": "tab:purple", "mdm_ls": "tab:blue", "lomdm": "tab:red", "right_to_left": "tab:green",
            "ar": "tab:orange"}
    for obj in objectives:
        for i, r in enumerate(r for r in records if r["objective"] == obj):
            steps = sorted(int(k) for k in r["evals"])
            ax.plot(steps, [r["evals"][str(k)] for k in steps], color=cmap.get(obj, "k"), alpha=0.7,
                    label=obj if i == 0 else None)
    ax.set(xlabel="step", ylabel="held-out NELBO (nats/token)", title="Held-out NELBO during training", yscale="log")
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"{prefix}_nelbo.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(str(path))
    return paths


def markdown_table(summary: dict, records: list[dict], objectives: list[str], seeds: list[int]) -> str:
    lines = ["| objective | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std | Spearman(pos, w) |",
             "|---|" + "---|" * len(seeds) + "---|---|"]
    for obj in objectives:
        by_seed = {r["seed"]: r for r in records if r["objective"] == obj}
        e = summary[obj]
        spear = (", ".join(f"{by_seed[s]['spearman_position_w']:+.2f}" for s in seeds if s in by_seed
                           and "spearman_position_w" in by_seed[s]) or "-")
        lines.append(f"| {obj} | " + " | ".join(f"{by_seed[s]['final_nelbo']:.4f}" if s in by_seed else "-"
                                               for s in seeds)
                     + f" | {e['mean']:.4f} +- {e['std']:.4f} | {spear} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    parser.add_argument("--out", default="runs/synthetic_order")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES),
                        choices=list(OBJECTIVES) + list(REFERENCES) + list(CONTROLS))
    parser.add_argument("--references", action="store_true",
                        help="also train the fixed right_to_left and ar (left-to-right) schedules (first seed only)")
    parser.add_argument("--plots", default=None, help="directory for the PNGs (default: OUT)")
    parser.add_argument("--quick", action="store_true", help="seconds-scale smoke configuration (for tests)")
    parser.add_argument("--noise", type=float, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--schedule-lr-mult", type=float, default=None)
    parser.add_argument("--exponent-range", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 32)")
    parser.add_argument("--plot-prefix", default="synthetic_order", help="file-name prefix of the PNGs")
    parser.add_argument("--replot", default=None, metavar="REPORT_JSON",
                        help="only redraw the plots (into --plots or OUT) from an existing report.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        report["plots"] = plot(report["records"], report["objectives"], Path(args.plots or args.out),
                               args.plot_prefix)
        print(report["table"], "\n", report["plots"])
        return report
    s = Settings.quick() if args.quick else Settings()
    if args.steps is not None:
        s.steps = args.steps
        s.eval_every = max(1, min(s.eval_every, args.steps))
    if args.noise is not None:
        s.noise = args.noise
    if args.seq_len is not None:
        s.seq_len = args.seq_len
    if args.schedule_lr_mult is not None:
        s.schedule_lr_mult = args.schedule_lr_mult
    if args.exponent_range is not None:
        s.exponent_range = args.exponent_range
    if args.eval_every is not None:
        s.eval_every = args.eval_every
    if args.batch is not None:
        s.batch = args.batch
    objectives = list(dict.fromkeys(args.objectives + (list(REFERENCES) if args.references else [])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data_dir = out / "data"
    data = write_dataset(data_dir, seq_len=s.seq_len, num_symbols=s.num_symbols, noise=s.noise,
                         num_train=s.num_train, num_heldout=s.num_heldout)
    heldout = (generate(s.num_heldout, s.seq_len, np.array(data["map"]), noise=s.noise,
                        rng=np.random.default_rng(99)) + FIRST_SYMBOL)
    records = [run_one(obj, seed, data_dir, out, s, heldout) for obj in objectives
               for seed in (args.seeds[:1] if obj in REFERENCES and obj not in args.objectives else args.seeds)]
    summary = summarise(records, objectives)
    plots = plot(records, objectives, Path(args.plots) if args.plots else out, args.plot_prefix)
    wall = time.time() - start
    report = {"command": "python experiments/synthetic_order.py " + " ".join(argv if argv is not None
                                                                             else sys.argv[1:]),
              "settings": s.__dict__, "data": data, "seeds": args.seeds, "objectives": objectives,
              "records": records, "summary": summary, "plots": plots, "wall_s": wall,
              "cpu_count": os.cpu_count()}
    report["table"] = markdown_table(summary, records, objectives, args.seeds)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(report["table"])
    print(f"exact-model floor: entropy rate {data['true_nll_per_token']:.4f}, on these held-out sequences "
          f"{data['heldout_exact_nll_per_token']:.4f} nats/token")
    for obj in LEARNED:
        if obj in summary and "margin_below_mdlm" in summary[obj]:
            e = summary[obj]
            print(f"{obj}: {e['margin_below_mdlm']:+.4f} below MDLM (seed noise {e['seed_noise']:.4f}); "
                  f"beats MDLM beyond noise: {e['beats_mdlm_beyond_noise']}")
    print(f"[synthetic_order] wall time {wall:.0f} s; report {out / 'report.json'}; plots {plots}")
    return report


if __name__ == "__main__":
    main()
