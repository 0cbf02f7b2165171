"""Synthetic order experiment: a task where right-to-left generation is clearly the best order (issue 5, exp. 1).

Data. Sequences of length L over V symbols (byte ids 'a', 'b', ...). The last two tokens are uniform; every other
token is a fixed random function of two tokens to its right, x_i = g(x_{i+1}, x_{c(i)}), g a random table
V x V -> V, with probability `noise` resampled uniformly (keeps the left end from collapsing onto g's cycles):

* task `chain2` (default): c(i) = i + 2, x_i = g(x_{i+1}, x_{i+2});
* task `key`: c(i) = L, x_i = g(x_{i+1}, x_L) (the last token is a key used at every step);
* task `collapse`: x_1 uniform, x_{i+1} = f(x_i) with f a random 2-to-1 map (the first design, mirrored).

Right-to-left, every conditional is one table lookup. From the left, x_{i+2} given the prefix is a posterior over
g's preimages weighted by a position-dependent prior (chain2), or requires inferring the key from all earlier pairs
(key); a random order has to compose g over gaps. An exact model reaches the same NELBO, -log p(x), under every
order (chain rule): any gap between objectives is about what a small network learns in a fixed budget, exactly
the effect learned orders exploit (Garg et al. 2025). The fixed references (`right_to_left`, `ar` =
left-to-right) measure which order is best for this network; the learned schedules should find it.

Runs. For each objective and seed one tiny denoiser is trained in-process with `mdm_scale.train.train` (via
experiments/common.py). Objective specs: mdlm | mdm_ls | lomdm | right_to_left | ar | mdlm_is, optionally with a
score-function baseline for the learned ones: `mdm_ls:time_binned`, `lomdm:rloo` (objective.score_baseline).
Reported: the held-out NELBO (per token, nats) at the end, mean and std over seeds, the margin of each learned
schedule below MDLM against seed noise, and the learned order.

Order convention (docs/objective.md, MISSION.md): alpha_i(t) = 1 - t^{w_i}, reveal time tau_i ~ Beta(w_i, 1),
E[tau_i] = w_i / (w_i + 1). Generation runs from t = 1 down to 0, so LARGER w_i = revealed EARLIER. Right-to-left
therefore means w_i increasing with position i: Spearman(position, w) = +1.

    scripts/in_venv.sh python experiments/synthetic_order.py --seeds 0 1 2 \
        --objectives mdlm mdm_ls mdm_ls:time_binned lomdm lomdm:time_binned --references \
        --out runs/synthetic_order --plots docs/results      # docs/results.md: 12 min on a loaded 2-core CPU
    scripts/in_venv.sh python experiments/synthetic_order.py --quick --out /tmp/so    # seconds, for the test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CONTROL_OVERRIDES, TrainSettings, compare_to_baseline, generation_order_stats,  # noqa: E402
                    learned_exponents, limit_threads, load_trained, machine_load, mean_std, override_settings,
                    run_config, spearman, train_run, write_token_dataset)
from synthetic_order_data import (FIRST_SYMBOL, TASKS, exact_nll_per_token, generate,  # noqa: E402,F401
                                 make_table, source_probabilities, true_nll_per_token)

OBJECTIVES = ("mdlm", "mdm_ls", "lomdm")
REFERENCES = ("right_to_left", "ar")
CONTROLS = tuple(CONTROL_OVERRIDES)
LEARNED = ("mdm_ls", "lomdm")
SCORE_BASELINES = ("rloo", "time_binned")
HELDOUT_ORDER_SEED = 99  # fresh generator sequences on which LoMDM's w(x) is read


def exact_heldout_nelbo(cfg, checkpoint_dir: Path, x: np.ndarray) -> float:
    """Exact NELBO (nats/token, t_min = 0) of a trained run on the token ids x [n, L]: no Monte Carlo over t or
    masks, so seeds compare without the held-out evaluation's sampling noise.

    The denoiser ignores t, so the NELBO is the order expectation of Prop. 3.1 over NLLs under all 2^L mask
    patterns (mdm_scale.exact): uniform Plackett-Luce for MDLM (every univariate schedule gives the same value),
    PL(w) for MDM-LS, one fixed order for left/right-to-left; LoMDM (w depends on x, plus the velocity-matching
    term of its backward scheduler) by the same lattice per sequence, step by step."""
    import torch

    from mdm_scale.exact import all_patterns, fixed_order_nelbo, pattern_nll_batch, plackett_luce_nelbo

    denoiser, schedule = load_trained(cfg, checkpoint_dir)
    if denoiser.time_embedding is not None:
        raise ValueError("the exact NELBO needs a denoiser that ignores t (model.time_conditioning=false)")
    kind, l = cfg.objective.schedule.kind, x.shape[1]
    x0, patterns = torch.as_tensor(np.asarray(x).astype(np.int64)), all_patterns(l)
    with torch.no_grad():
        nll, backward = pattern_nll_batch(denoiser, x0, patterns,
                                          scheduler_head="backward_scheduler" if kind == "lomdm" else None)
        mean = nll.double().mean(0)
        if kind == "lomdm":
            total = lomdm_exact_nelbo(denoiser, schedule, x0, nll, backward)
        elif kind == "mdm_ls":
            total = plackett_luce_nelbo(schedule.exponents(l), mean).item()
        elif kind in ("left_to_right", "right_to_left", "fixed_order"):
            order = {"left_to_right": range(l), "right_to_left": range(l - 1, -1, -1)}.get(kind, cfg.objective.schedule.order)
            total = fixed_order_nelbo(order, mean)
        elif kind in ("loglinear", "cosine", "polynomial"):
            total = plackett_luce_nelbo(torch.ones(l), mean).item()
        else:
            raise ValueError(f"no exact NELBO for schedule kind {kind!r}")
    return total / l


def lomdm_exact_nelbo(denoiser, schedule, x0, nll, backward_logits, reconstruction_only: bool = False) -> float:
    """LoMDM's exact NELBO per sequence (sum over positions), averaged over x0 [n, L], from the pattern NLLs and
    backward-scheduler logits of `pattern_nll_batch` [n, P, L]: w(x) from the forward scheduler on clean x, the
    Plackett-Luce lattice per sequence with the velocity-matching term of each step (docs/objective.md, 4c).
    reconstruction_only: the Plackett-Luce reconstruction part alone (no velocity term)."""
    import torch

    from mdm_scale.exact import plackett_luce_nelbo

    forward = denoiser.scheduler_logits("forward_scheduler", denoiser(x0, torch.zeros(len(x0))))
    w = schedule.exponents(forward)
    w_hat = None if reconstruction_only else schedule.backward_exponents(backward_logits)
    return plackett_luce_nelbo(w, nll, w_hat).mean().item()


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class Settings(TrainSettings):
    task: str = "chain2"
    num_symbols: int = 8
    noise: float = 0.02
    source_skew: float = 0.0
    """Law of the source tokens, p_j proportional to (j + 1)^-skew (0 = uniform; see synthetic_order_data)."""
    num_train: int = 20000
    num_heldout: int = 512
    data_seed: int = 1234
    seq_len: int = 8
    steps: int = 600
    eval_every: int = 200
    batch: int = 128
    schedule_lr_mult: float = 30.0
    """Learning-rate multiplier for the schedule parameters only (MDM-LS position logits, LoMDM scheduler heads);
    1 = the library default (one learning rate for everything)."""
    exponent_range: float = 1.5
    """c2 of w = c1 + c2 NormSig(.) (the presets' 1.5 bounds w to [0.25, 1.75])."""

    @classmethod
    def quick(cls) -> "Settings":
        return cls(seq_len=8, num_train=512, num_heldout=64, steps=6, eval_every=3, layers=1, hidden=32, heads=2,
                   batch=8, eval_batches=2, eval_time_samples=1, warmup=2)


# Command-line options that set a Settings field of the same name, applied in this order; --steps alone also
# caps eval_every at the new step count (an explicit --eval-every wins).
SETTING_OPTIONS = ("task", "num_symbols", "noise", "source_skew", "seq_len", "steps", "eval_every", "batch", "lr",
                   "layers", "hidden", "heads", "num_train", "schedule_lr_mult", "exponent_range")


def parse_objective(spec: str) -> tuple[str, str | None]:
    """'mdm_ls:time_binned' -> ('mdm_ls', 'time_binned'); 'mdlm' -> ('mdlm', None); 'fixed:4.3.2.1.0.5.6.7' ->
    ('fixed', '4.3.2.1.0.5.6.7') (a fixed generation order, 0-based positions, first generated first)."""
    base, _, baseline = spec.partition(":")
    if base == "fixed":
        order = [int(i) for i in baseline.split(".")] if baseline else []
        if sorted(order) != list(range(len(order))) or not order:
            raise ValueError(f"{spec!r}: a fixed order is 'fixed:' + a permutation of 0..L-1 joined by '.'")
        return base, baseline
    if base not in OBJECTIVES + REFERENCES + CONTROLS:
        raise ValueError(f"unknown objective {base!r}")
    if baseline and (base not in LEARNED or baseline not in SCORE_BASELINES):
        raise ValueError(f"{spec!r}: a score baseline ({'|'.join(SCORE_BASELINES)}) applies to {LEARNED} only")
    return base, baseline or None


def objective_overrides(spec: str, s: Settings) -> list[str]:
    base, baseline = parse_objective(spec)
    if base in CONTROL_OVERRIDES:
        return list(CONTROL_OVERRIDES[base])
    # The fixed orders are references for the learned ones, so they keep the same bidirectional denoiser (the
    # masked-diffusion form of a fixed order), not objective=ar's causal teacher forcing.
    masked_diffusion = ["objective=ar", "objective.causal=false"]
    if base == "ar":
        return masked_diffusion
    if base == "right_to_left":
        return masked_diffusion + ["objective.schedule.kind=right_to_left"]
    if base == "fixed":
        return masked_diffusion + ["objective.schedule.kind=fixed_order",
                                   f"objective.schedule.order=[{baseline.replace('.', ',')}]"]
    out = [f"objective={base}"]
    if base in LEARNED:
        out.append(f"objective.schedule.exponent_range={s.exponent_range}")
    if baseline:
        out.append(f"objective.score_baseline={baseline}")
    return out


# ---------------------------------------------------------------------------------------------------- runs
EXACT_MAX_LEN = 10
"""Longest L for the exact NELBO (2^L mask patterns per sequence); longer runs report the Monte-Carlo eval only."""


def run_one(spec: str, seed: int, data_dir: Path, out: Path, s: Settings, order_x: np.ndarray,
            heldout_x: np.ndarray, label: str | None = None) -> dict:
    """Train one objective spec with one seed; `label` names the record instead of the spec (the retrained
    learned orders: one spec per seed, one label for all)."""
    label = label or spec
    safe = label.replace(":", "-").replace("/", "-")
    run_dir = out / "runs" / f"{safe}-s{seed}"
    cfg = run_config(objective_overrides(spec, s), data_dir=data_dir, run_dir=run_dir,
                     name=f"synthetic-{safe}-s{seed}", seed=seed, s=s)
    result = train_run(cfg)
    record = {"objective": label, "spec": spec, "seed": seed,
              **{k: v for k, v in result.items() if k != "checkpoint"}}
    if s.seq_len <= EXACT_MAX_LEN:
        record["exact_nelbo"] = exact_heldout_nelbo(cfg, run_dir / "checkpoints", heldout_x)
    w_all = learned_exponents(cfg, run_dir / "checkpoints", order_x, per_sample=True)
    if w_all is not None:
        w = w_all.mean(0)
        record["exponents"] = w.tolist()
        if cfg.objective.schedule.kind == "lomdm":
            record["exponents_per_sample_head"] = w_all[:64].tolist()
            record["exponents_sample_std"] = w_all.std(0).tolist()
        record["mean_reveal_time"] = (w_all / (w_all + 1)).mean(0).tolist()
        record["spearman_position_w"] = spearman(np.arange(len(w)), w)
        record.update(generation_order_stats(w_all, seed=seed))
    print(f"[synthetic_order] {label} seed {seed}: final held-out NELBO {record['final_nelbo']:.4f} "
          + (f"(exact {record['exact_nelbo']:.4f}) " if "exact_nelbo" in record else "")
          + f"({record['wall_s']:.0f} s, load {record['load_after'][:1]})"
          + (f", Spearman(position, w) {record['spearman_position_w']:+.3f}, P(right neighbour first) "
             f"{record['p_right_neighbour_first']:.3f}" if w_all is not None else ""), flush=True)
    return record


def modal_order(w) -> list[int]:
    """Positions (0-based) by decreasing exponent: the most likely generation order of PL(w)."""
    return [int(i) for i in np.argsort(-np.asarray(w), kind="stable")]


def retrain_learned_orders(records: list[dict], run, seeds: list[int]) -> list[dict]:
    """For every MDM-LS record, train a fixed-order denoiser (same seed and budget) on its modal learned order:
    how good the order it found is when a denoiser is trained on it alone, next to right_to_left's."""
    out = []
    for r in [r for r in records if parse_objective(r["spec"])[0] == "mdm_ls" and r["seed"] in seeds]:
        order = modal_order(r["exponents"])
        rec = run(f"fixed:{'.'.join(map(str, order))}", r["seed"], label=f"{r['objective']}/retrained")
        rec["order"] = [i + 1 for i in order]
        out.append(rec)
    return out


def headline(record: dict) -> float:
    """The NELBO the comparisons use: the exact one where computed, else the trainer's Monte-Carlo eval."""
    return record.get("exact_nelbo", record["final_nelbo"])


def summarise(records: list[dict], objectives: list[str]) -> dict:
    summary = {}
    for obj in objectives:
        rs = [r for r in records if r["objective"] == obj]
        if not rs:
            continue
        ms = mean_std([headline(r) for r in rs])
        entry = {"nelbo": ms["values"], "mean": ms["mean"], "std": ms["std"], "seeds": [r["seed"] for r in rs],
                 "metric": "exact_nelbo" if "exact_nelbo" in rs[0] else "final_nelbo"}
        if "exact_nelbo" in rs[0]:
            mc = mean_std([r["final_nelbo"] for r in rs])
            entry["monte_carlo_eval"] = {"mean": mc["mean"], "std": mc["std"]}
        if any("spearman_position_w" in r for r in rs):
            entry["spearman_position_w"] = [r["spearman_position_w"] for r in rs]
            entry["spearman_mean"] = float(np.mean(entry["spearman_position_w"]))
            entry["p_right_neighbour_first"] = [r["p_right_neighbour_first"] for r in rs]
        summary[obj] = entry
    for obj, e in summary.items():
        for ref in ("mdlm", "right_to_left"):
            if ref in summary and obj != ref and summary[ref]["seeds"] == e["seeds"]:
                cmp = compare_to_baseline(summary[ref]["nelbo"], e["nelbo"])
                suffix = "mdlm" if ref == "mdlm" else "right_to_left"
                e[f"margin_below_{suffix}"] = cmp["margin"]
                e[f"seed_noise_vs_{suffix}"] = cmp["seed_noise"]
                e[f"paired_differences_vs_{suffix}"] = cmp.get("paired_differences")
                e[f"beats_{suffix}_beyond_noise"] = cmp["beats_beyond_noise"]
        if "margin_below_mdlm" in e:  # short names (as in the first version of the report)
            e["seed_noise"], e["paired_differences"] = e["seed_noise_vs_mdlm"], e["paired_differences_vs_mdlm"]
    return summary


def plot(records: list[dict], objectives: list[str], out_dir: Path, prefix: str = "synthetic_order",
         floor: float | None = None) -> list[str]:
    from mdm_scale import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    palette = {"mdlm": "tab:gray", "mdlm_is": "tab:purple", "mdm_ls": "tab:blue", "lomdm": "tab:red",
               "right_to_left": "tab:green", "ar": "tab:orange", "mdm_ls:time_binned": "tab:cyan",
               "lomdm:time_binned": "tab:pink", "mdm_ls:rloo": "tab:blue", "lomdm:rloo": "tab:red"}
    colors = {o: palette.get(o, f"C{i}") for i, o in enumerate(objectives)}
    paths = []
    learned = {f"{r['objective']} s{r['seed']} (rho {r['spearman_position_w']:+.2f})": r["exponents"]
               for r in records if "exponents" in r}
    if learned:
        paths.append(plots.reveal_time_by_position(
            learned, out_dir / f"{prefix}_learned_order.png", colors=colors,
            title="Learned order (larger E[tau] = generated earlier; right-to-left = increasing)"))
        for obj in dict.fromkeys(r["objective"] for r in records if "exponents" in r):
            r = next(r for r in records if r["objective"] == obj and "exponents" in r)
            w = r.get("exponents_per_sample_head", r["exponents"])
            paths.append(plots.exponent_heatmap(w, out_dir / f"{prefix}_heatmap_{obj.replace(':', '-')}.png",
                                                title=f"{obj}, seed {r['seed']}"))
    curves = {f"{r['objective']} s{r['seed']}": [tuple(p) for p in r["curve"]] for r in records}
    paths.append(plots.training_curves(curves, out_dir / f"{prefix}_nelbo.png", colors=colors, logy=True,
                                       hlines={"exact model (held-out)": floor} if floor is not None else None))
    return paths


def markdown_table(summary: dict, records: list[dict], objectives: list[str], seeds: list[int]) -> str:
    lines = ["| objective | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean +- std | Monte-Carlo eval, mean +- std | Spearman(pos, w) | P(right neighbour first) |",
             "|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for obj in objectives:
        if obj not in summary:
            continue
        by_seed = {r["seed"]: r for r in records if r["objective"] == obj}
        e = summary[obj]
        learned = [by_seed[s] for s in seeds if s in by_seed and "spearman_position_w" in by_seed[s]]
        spear = ", ".join(f"{r['spearman_position_w']:+.2f}" for r in learned) or "-"
        prf = ", ".join(f"{r['p_right_neighbour_first']:.2f}" for r in learned) or "-"
        mc = e.get("monte_carlo_eval")
        lines.append(f"| {obj} | " + " | ".join(f"{headline(by_seed[s]):.4f}" if s in by_seed else "-"
                                               for s in seeds)
                     + f" | {e['mean']:.4f} +- {e['std']:.4f} | "
                     + (f"{mc['mean']:.4f} +- {mc['std']:.4f}" if mc else "(the same)") + f" | {spear} | {prf} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/synthetic_order")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES),
                        help="objective specs: " + " | ".join(OBJECTIVES + REFERENCES + CONTROLS)
                             + "; learned ones optionally with :rloo or :time_binned (score-function baseline)")
    parser.add_argument("--references", action="store_true",
                        help="also train the fixed right_to_left and ar (left-to-right) schedules (every seed)")
    parser.add_argument("--plots", default=None, help="directory for the PNGs (default: OUT)")
    parser.add_argument("--quick", action="store_true", help="seconds-scale smoke configuration (for tests)")
    parser.add_argument("--task", choices=TASKS, default=None, help="data generator (default chain2)")
    parser.add_argument("--num-symbols", type=int, default=None, help="V (default 8)")
    parser.add_argument("--noise", type=float, default=None, help="resampling probability (default 0.02)")
    parser.add_argument("--source-skew", type=float, default=None,
                        help="source tokens p_j ~ (j+1)^-skew (default 0: uniform)")
    parser.add_argument("--seq-len", type=int, default=None, help="L (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 600)")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 128)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--schedule-lr-mult", type=float, default=None)
    parser.add_argument("--exponent-range", type=float, default=None)
    parser.add_argument("--retrain-learned-order", action="store_true",
                        help="also train a fixed-order denoiser on each MDM-LS run's modal learned order")
    parser.add_argument("--plot-prefix", default="synthetic_order", help="file-name prefix of the PNGs")
    parser.add_argument("--replot", default=None, metavar="REPORT_JSON",
                        help="only redraw the plots (into --plots or OUT) from an existing report.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "disabled")
    limit_threads(1)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        report["plots"] = plot(report["records"], report["objectives"], Path(args.plots or args.out),
                               args.plot_prefix, report["data"].get("heldout_exact_nll_per_token"))
        print(report["table"], "\n", report["plots"])
        return report
    s = Settings.quick() if args.quick else Settings()
    changed = override_settings(s, args, SETTING_OPTIONS)
    if "steps" in changed and "eval_every" not in changed:
        s.eval_every = max(1, min(s.eval_every, s.steps))
    objectives = list(dict.fromkeys(args.objectives + (list(REFERENCES) if args.references else [])))
    for spec in objectives:
        parse_objective(spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.time(), machine_load()
    g = make_table(s.num_symbols, s.data_seed, s.task)
    rng = np.random.default_rng(s.data_seed + 1)
    splits = {split: generate(n, s.seq_len, g, noise=s.noise, rng=rng, task=s.task,
                             source_skew=s.source_skew)
              for split, n in (("train", s.num_train), ("heldout", s.num_heldout))}
    data_dir = out / "data"
    write_token_dataset(data_dir, splits, tokenizer="byte", offset=FIRST_SYMBOL)
    data = {"task": s.task, "table": g.tolist(), "seq_len": s.seq_len, "num_symbols": s.num_symbols,
            "noise": s.noise, "source_skew": s.source_skew, "num_train": s.num_train, "num_heldout": s.num_heldout,
            "true_nll_per_token": true_nll_per_token(s.num_symbols, s.seq_len, s.noise, s.task, s.source_skew),
            "heldout_exact_nll_per_token": exact_nll_per_token(splits["heldout"], g, s.noise, s.task, s.source_skew),
            "train_exact_nll_per_token": exact_nll_per_token(splits["train"], g, s.noise, s.task, s.source_skew)}
    order_x = generate(s.num_heldout, s.seq_len, g, noise=s.noise, rng=np.random.default_rng(HELDOUT_ORDER_SEED),
                       task=s.task, source_skew=s.source_skew) + FIRST_SYMBOL

    def run(spec, seed, label=None):
        return run_one(spec, seed, data_dir, out, s, order_x, splits["heldout"] + FIRST_SYMBOL, label)

    records = [run(obj, seed) for obj in objectives for seed in args.seeds]
    if args.retrain_learned_order:
        retrained = retrain_learned_orders(records, run, args.seeds)
        records += retrained
        objectives += list(dict.fromkeys(r["objective"] for r in retrained))
    summary = summarise(records, objectives)
    plots = plot(records, objectives, Path(args.plots) if args.plots else out, args.plot_prefix,
                 data["heldout_exact_nll_per_token"])
    wall = time.time() - start
    report = {"command": "python experiments/synthetic_order.py " + " ".join(argv if argv is not None
                                                                             else sys.argv[1:]),
              "settings": asdict(s), "data": data, "seeds": args.seeds, "objectives": objectives,
              "records": records, "summary": summary, "plots": plots, "wall_s": wall,
              "machine_start": load_start, "machine_end": machine_load(), "cpu_count": os.cpu_count()}
    report["table"] = markdown_table(summary, records, objectives, args.seeds)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(report["table"])
    print(f"exact-model floor: entropy rate {data['true_nll_per_token']:.4f}, on these held-out sequences "
          f"{data['heldout_exact_nll_per_token']:.4f} nats/token")
    for obj, e in summary.items():
        if "margin_below_mdlm" in e:
            print(f"{obj}: {e['margin_below_mdlm']:+.4f} below MDLM (seed noise {e['seed_noise_vs_mdlm']:.4f}; "
                  f"beyond noise: {e['beats_mdlm_beyond_noise']})"
                  + (f", {e['margin_below_right_to_left']:+.4f} below right_to_left"
                     if "margin_below_right_to_left" in e else ""))
    print(f"[synthetic_order] wall time {wall:.0f} s (load {load_start['loadavg_1_5_15']} -> "
          f"{report['machine_end']['loadavg_1_5_15']}); report {out / 'report.json'}; plots {plots}")
    return report


if __name__ == "__main__":
    main()
