"""MDLM with and without MIRROR + P-POTS at equal tokens on the embedded corpus (issue 11): final held-out NELBO
over seeds, and the seed-to-seed spread.

    scripts/in_venv.sh python experiments/variance_reduction.py --seeds 0 1 2 --out runs/variance_reduction

Both arms use the `tiny` config (the embedded corpus, GPT-2 tokenizer) with the same steps and the same rows per
step: the baseline's micro-batch holds `--batch` sequences, the variance-reduced arm's `--batch / 2` sequences,
each twice as a MIRROR pair (equal tokens through the denoiser; the reduced arm sees half as many distinct
sequences). Evaluation is the trainer's held-out NELBO (MDLM's protocol: antithetic times, independent masks, the
same batches and noise seed for both arms), so the two arms are scored by the same estimator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import compare_to_baseline, limit_threads, machine_load, mean_std, train_run  # noqa: E402

ARMS = {
    "mdlm": [],
    "mdlm + mirror + p_pots": ["objective.t_sampler=p_pots", "objective.mask_pairs=mirror"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16, help="rows per step (both arms)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--out", default="runs/variance_reduction")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from mdm_scale.config import load_config

    limit_threads(args.threads)
    start, runs = time.time(), {}
    for arm, extra in ARMS.items():
        for seed in args.seeds:
            mirrored = "objective.mask_pairs=mirror" in extra
            batch = args.batch // 2 if mirrored else args.batch
            # The held-out sample is drawn in micro-batches: twice as many half-size batches = the same sequences.
            eval_batches = args.eval_batches * (2 if mirrored else 1)
            cfg = load_config("tiny", [
                "objective=mdlm", *extra, f"train.seed={seed}", f"train.steps={args.steps}",
                f"train.eval_every={max(args.steps // 4, 1)}", f"train.eval_batches={eval_batches}",
                f"data.micro_batch_size={batch}", f"data.seq_len={args.seq_len}", "sampling.num_samples=0",
                "logging.wandb=false", "logging.progress=false", "checkpoint.resume=true",  # a rerun re-evaluates finished runs
                f"run_dir={Path(args.out) / arm.replace(' + ', '_') / f'seed{seed}'}",
            ])
            run = train_run(cfg)
            runs.setdefault(arm, []).append(run)
            print(f"{arm:24s} seed {seed}: final held-out NELBO {run['final_nelbo']:.4f} ({run['wall_s']:.0f} s)",
                  flush=True)
    finals = {arm: [r["final_nelbo"] for r in rs] for arm, rs in runs.items()}
    summary = {arm: mean_std(v) for arm, v in finals.items()}
    names = list(ARMS)
    comparison = compare_to_baseline(finals[names[0]], finals[names[1]])
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean +- std |",
             "|---" * (len(args.seeds) + 2) + "|"]
    for arm, v in finals.items():
        lines.append(f"| {arm} | " + " | ".join(f"{x:.4f}" for x in v)
                     + f" | {summary[arm]['mean']:.4f} +- {summary[arm]['std']:.4f} |")
    table = "\n".join(lines)
    wall = time.time() - start
    print(f"\n{table}\n\nmargin (mdlm - reduced) {comparison['margin']:+.4f}, seed noise {comparison['seed_noise']:.4f}, "
          f"paired differences {[round(d, 4) for d in comparison.get('paired_differences', [])]}\n"
          f"wall time {wall:.0f} s, machine {machine_load()}")
    report = {"args": vars(args), "arms": ARMS, "runs": runs, "summary": summary, "comparison": comparison,
              "table": table, "wall_s": wall, "machine": machine_load()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
