"""The five objectives on text at equal tokens (issue 5, experiment 3): mdlm, ar, block, mdm_ls, lomdm.

Every run is the `tiny` config (2 blocks, hidden 128, GPT-2 tokenizer, seq 128, batch 16, the embedded corpus:
gensim's Wikipedia excerpt, the KJV Bible and Shakespeare) with one preset `objective=<name>` and nothing else
changed between objectives: same model, batch, sequence length, steps (so the same number of training tokens),
learning rate and seeds. The presets are used exactly (the library's one-learning-rate optimizer; no schedule
learning-rate multiplier as in synthetic_order.py).

Reported per run: the held-out NELBO per token (nats) from mdm_scale.evaluation.evaluate_checkpoint on the first
`--eval-batches` held-out batches in stored order (the same sequences for every objective, but not a sample of
every source: the held-out split is stored source by source) with `--eval-time-samples` time draws each, for `ar`
also the exact causal NLL on the same sequences (one pass per position); the trainer's last evaluation (a fixed
random sample of held-out windows over every source); the wall time and the machine's load average; the training curves (held-out NELBO at every `--eval-every` steps on the trainer's
`train.eval_batches` batches, and the training loss) are read back from each run's metrics.jsonl.

    scripts/in_venv.sh python experiments/text_objectives.py --out runs/text_objectives --plots docs/results
    scripts/in_venv.sh python experiments/text_objectives.py --quick --out /tmp/to    # smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when imported by path (tests)
from common import limit_threads, machine_load, mean_std  # noqa: E402

OBJECTIVES = ("mdlm", "ar", "block", "mdm_ls", "lomdm")
COLORS = {"mdlm": "tab:gray", "ar": "tab:orange", "block": "tab:green", "mdm_ls": "tab:blue", "lomdm": "tab:red"}


def run_config(objective: str, seed: int, run_dir: Path, *, steps: int, eval_every: int, log_every: int,
               extra: list[str] | tuple[str, ...] = ()):
    """The `tiny` config with `objective=<objective>`: only steps, evaluation cadence, seed and logging change."""
    from mdm_scale.config import load_config

    return load_config("tiny", [
        f"objective={objective}", f"train.steps={steps}", f"train.eval_every={eval_every}", f"train.seed={seed}",
        "train.device=cpu", "logging.wandb=false", "logging.progress=false", f"logging.log_every={log_every}",
        "sampling.num_samples=0", "checkpoint.resume=false", f"run_dir={run_dir}",
        f"name=text-{objective}-s{seed}", *extra,
    ])


def read_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """{"nelbo_curve": [[step, eval/nelbo], ...], "loss_curve": [[step, train/loss], ...]} from metrics.jsonl."""
    from mdm_scale.metrics import read_metrics

    curves: dict[str, list[list[float]]] = {"nelbo_curve": [], "loss_curve": []}
    for row in read_metrics(run_dir):
        if "eval/nelbo" in row:
            curves["nelbo_curve"].append([int(row["step"]), float(row["eval/nelbo"])])
        if "train/loss" in row:
            curves["loss_curve"].append([int(row["step"]), float(row["train/loss"])])
    return curves


def run_one(objective: str, seed: int, out: Path, args) -> dict:
    import mdm_scale.train as trainer
    from mdm_scale.evaluation import evaluate_checkpoint

    run_dir = out / "runs" / f"{objective}-s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to: start clean
    cfg = run_config(objective, seed, run_dir, steps=args.steps, eval_every=args.eval_every,
                     log_every=args.log_every, extra=args.override)
    load_before = machine_load()["loadavg_1_5_15"]
    start = time.time()
    result = trainer.train(cfg)
    train_wall = time.time() - start
    load_after = machine_load()["loadavg_1_5_15"]
    start = time.time()
    final = evaluate_checkpoint(result.checkpoint, time_samples=args.eval_time_samples,
                                max_batches=args.eval_batches, seed=1234)
    eval_wall = time.time() - start
    tokens = args.steps * cfg.data.micro_batch_size * cfg.data.grad_accumulation * cfg.data.seq_len
    record = {"objective": objective, "seed": seed, "heldout_nelbo": final["nelbo"], "eval": final,
              "train_tokens": tokens, "train_wall_s": train_wall, "eval_wall_s": eval_wall,
              "tokens_per_s": tokens / train_wall, "load_before": load_before, "load_after": load_after,
              "checkpoint": result.checkpoint, "metrics_jsonl": str(run_dir / "metrics.jsonl"),
              **read_curves(run_dir)}
    if "exact_nll" in final:
        record["exact_nll"] = final["exact_nll"]
    print(f"[text_objectives] {objective} seed {seed}: held-out NELBO {final['nelbo']:.4f}"
          + (f", exact AR NLL {final['exact_nll']:.4f}" if "exact_nll" in final else "")
          + f" nats/token ({train_wall:.0f} s train, {eval_wall:.0f} s eval, load {load_after[0]:.2f})", flush=True)
    return record


def markdown_table(records: list[dict], objectives: list[str], seeds: list[int]) -> str:
    """NELBO columns: evaluate_checkpoint on the first `--eval-batches` stored held-out batches (per seed, then
    mean +- std and its PPL bound); "trainer eval": the trainer's last evaluation (a fixed random sample of held-out
    windows over every source, `train.eval_batches` batches), mean over seeds."""
    lines = ["| objective | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean +- std | PPL bound | exact AR NLL | trainer eval | train wall (s) | tokens/s |",
             "|---|" + "---|" * len(seeds) + "---|---|---|---|---|---|"]
    for obj in objectives:
        rs = [r for r in records if r["objective"] == obj]
        by_seed = {r["seed"]: r for r in rs}
        e = mean_std([r["heldout_nelbo"] for r in rs])
        exact = [r["exact_nll"] for r in rs if "exact_nll" in r]
        lines.append(f"| {obj} | " + " | ".join(f"{by_seed[s]['heldout_nelbo']:.4f}" if s in by_seed else "-"
                                               for s in seeds)
                     + f" | {e['mean']:.4f} +- {e['std']:.4f} | {np.exp(e['mean']):.1f} | "
                     + (f"{np.mean(exact):.4f}" if exact else "-")
                     + f" | {np.mean([r['nelbo_curve'][-1][1] for r in rs]):.4f}"
                     + f" | {np.mean([r['train_wall_s'] for r in rs]):.0f}"
                     + f" | {np.mean([r['tokens_per_s'] for r in rs]):.0f} |")
    return "\n".join(lines)


def plot(records: list[dict], out_dir: Path, prefix: str = "text") -> list[str]:
    from mdm_scale.plots import training_curves

    paths = [training_curves({f"{r['objective']} s{r['seed']}": r["nelbo_curve"] for r in records},
                             out_dir / f"{prefix}_heldout_nelbo.png", colors=COLORS,
                             title="tiny (embedded corpus): held-out NELBO during training", logy=True),
             training_curves({f"{r['objective']} s{r['seed']}": r["loss_curve"] for r in records},
                             out_dir / f"{prefix}_train_loss.png", colors=COLORS, logy=True,
                             ylabel="training loss (NELBO estimate, nats/token)",
                             title="tiny (embedded corpus): training loss")]
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="held-out batches (x 16 sequences) in the final evaluation")
    parser.add_argument("--eval-time-samples", type=int, default=4)
    parser.add_argument("--out", default="runs/text_objectives")
    parser.add_argument("--plots", default=None, help="directory for the PNGs (default OUT)")
    parser.add_argument("--plot-prefix", default="text")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra config overrides for every run (e.g. the test's smaller model)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 1 eval batch")
    parser.add_argument("--replot", default=None, metavar="REPORT",
                        help="redraw the plots and the table of a report.json, no training")
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        objectives = list(dict.fromkeys(r["objective"] for r in report["records"]))
        seeds = sorted({r["seed"] for r in report["records"]})
        report["table"] = markdown_table(report["records"], objectives, seeds)
        report["plots"] = plot(report["records"], Path(args.plots or Path(args.replot).parent), args.plot_prefix)
        Path(args.replot).write_text(json.dumps(report, indent=1))
        print(report["table"])
        return report
    if args.quick:
        args.steps, args.eval_every, args.log_every, args.eval_batches, args.eval_time_samples = 4, 2, 1, 1, 1
        args.override = ["train.eval_batches=1", "train.eval_time_samples=1", "data.micro_batch_size=4",
                         "model.hidden_size=32", "model.num_attention_heads=2",
                         "model.scheduler_head_size=16", "model.num_layers=1", "optimizer.warmup_steps=1",
                         *args.override]
    limit_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine_before = machine_load()
    start = time.time()
    records = [run_one(obj, seed, out, args) for seed in args.seeds for obj in args.objectives]
    wall = time.time() - start
    report = {"command": " ".join(["experiments/text_objectives.py", *(sys.argv[1:] if argv is None else argv)]),
              "settings": {k: v for k, v in vars(args).items()}, "records": records,
              "summary": {obj: mean_std([r["heldout_nelbo"] for r in records if r["objective"] == obj])
                          for obj in args.objectives},
              "table": markdown_table(records, args.objectives, args.seeds), "wall_s": wall,
              "machine_before": machine_before, "machine_after": machine_load()}
    report["plots"] = plot(records, Path(args.plots) if args.plots else out, args.plot_prefix)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(report["table"])
    print(f"[text_objectives] wall {wall:.0f} s; report {out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
