"""The character-level language benchmark (docs/results.md, "Language (character level)"). Owner: the core team.

    scripts/in_venv.sh python experiments/char_lm.py prepare                  # shards -> data/char_lm (~1 min)
    OMP_NUM_THREADS=1 nohup scripts/in_venv.sh python launchers/local.py config=char_lm objective=mdlm \\
        train.seed=0 run_dir=runs/char_lm/mdlm-s0 > runs/char_lm/mdlm-s0.log 2>&1 &    # one run; rerun = resume
    scripts/in_venv.sh python experiments/char_lm.py progress runs/char_lm    # curves so far, a markdown table
    scripts/in_venv.sh python experiments/char_lm.py report runs/char_lm --out docs/results/char_lm

`prepare` writes the offline corpus as bytes, one document per whole work (a Wikipedia article, a book of the
Bible, a Shakespeare play), every 20th held out, packed in 256-byte windows; it prints the held-out unigram
cross-entropy (the bits/byte of a model that ignores context) that the models must beat. Training is the library's
own launcher (configs/char_lm.yaml): nothing here trains; `queue` runs launcher commands one after another.
`report`, `evaluate` and `progress` read run directories (experiments/char_lm_report.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import char_lm_report  # noqa: E402
import char_lm_verdicts  # noqa: E402
from data_pipeline import books  # noqa: E402
from data_pipeline.corpus import wikipedia_documents  # noqa: E402
from data_pipeline.preprocess import preprocess  # noqa: E402

HELDOUT_EVERY = 20
SEQ_LEN = 256


def documents() -> list[str]:
    """Whole works in a fixed order: Wikipedia articles, then books of the Bible, then Shakespeare's works."""
    return wikipedia_documents() + books.kjv_books() + books.shakespeare_documents()


def unigram_cross_entropy_bits(train: np.ndarray, heldout: np.ndarray, vocab: int = 257) -> float:
    """Bits per token of the held-out tokens under the training split's unigram distribution (add-one smoothed):
    what a model that ignores context can reach."""
    counts = np.bincount(train.ravel(), minlength=vocab).astype(np.float64) + 1
    log_p = np.log2(counts / counts.sum())
    return float(-log_p[heldout.ravel()].mean())


def read_split(root: Path, split: str) -> np.ndarray:
    """All windows [n, seq_len] of a split (uint32), read through the library's checked reader."""
    from data_pipeline.datasets import open_split
    from data_pipeline.tokenizer import load_tokenizer

    batches = open_split(root, split, load_tokenizer("byte"), seq_len=SEQ_LEN, batch_size=256, seed=0,
                         shuffle=False)
    return np.concatenate([batches.batch_at(0, k * 256).numpy() for k in range(batches.batches_per_epoch)])


def prepare(out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "char_lm.jsonl"
        with open(source, "w") as f:
            for text in documents():
                f.write(json.dumps({"text": text}) + "\n")
        stats = preprocess([source], out, format="mds", tokenizer="byte", seq_len=SEQ_LEN, pack="wrap",
                           heldout_every=HELDOUT_EVERY, overwrite=True)
    train, heldout = read_split(out, "train"), read_split(out, "heldout")
    summary = {"documents": stats.documents, "bytes": stats.tokens, "windows": stats.samples,
               "heldout_unigram_bits_per_byte": unigram_cross_entropy_bits(train, heldout)}
    (out / "char_lm.json").write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------------------------- queue
# Named variants of a preset (queue items "<name>:<seed>", run directories <name>-s<seed>, their own report rows).
VARIANTS = {
    # the paper's LoMDM with c2 = 0: its fixed 1 - t^0.7 schedule, two draws per sequence and schedulers, and no
    # learned order; against lomdm_paper it isolates what the learned order adds, against mdlm the rest of the recipe
    "lomdm_paper_fixed": ("lomdm_paper", ("objective.schedule.exponent_range=0",)),
}


def run_command(name: str, seed: int, root: Path) -> list[str]:
    """The launcher command of one run (what docs/results.md records); rerunning it resumes the run. `name`: an
    objective preset or one of VARIANTS."""
    objective, overrides = VARIANTS.get(name, (name, ()))
    return [sys.executable, str(Path(__file__).resolve().parent.parent / "launchers/local.py"), "config=char_lm",
            f"objective={objective}", *overrides, f"train.seed={seed}", f"run_dir={root / f'{name}-s{seed}'}"]


def queue(specs: list[str], root: Path, poll_s: float = 60.0) -> int:
    """Run `name:seed` items (an objective preset or one of VARIANTS) one after another (one thread each;
    mdm_scale/run_queue.py), skipping finished runs and waiting while another process holds a run; each run's
    output is appended to <root>/<name>-s<seed>.log. Returns the number of runs that failed."""
    from mdm_scale.run_queue import run_in_order

    root.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in specs:
        name, seed = spec.split(":")
        runs.append((root / f"{name}-s{seed}", run_command(name, int(seed), root), root / f"{name}-s{seed}.log"))
    return run_in_order(runs, poll_s=poll_s, report=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the byte shards")
    prep.add_argument("--out", default="data/char_lm")
    que = sub.add_parser("queue", help="train objective:seed items one after another (resumable)")
    que.add_argument("specs", nargs="+", metavar="OBJECTIVE:SEED")
    que.add_argument("--root", default="runs/char_lm")
    prog = sub.add_parser("progress", help="the runs' training-time curves as a markdown table (reads logs only)")
    prog.add_argument("root", nargs="?", default="runs/char_lm")
    rep = sub.add_parser("report", help="evaluate every run under a root and write report.json and plots")
    rep.add_argument("root", help="a folder of run directories named <objective>-s<seed>")
    rep.add_argument("--out", default="docs/results/char_lm")
    rep.add_argument("--batches", type=int, default=None,
                     help="held-out batches (of 16 windows) evaluated, from the split's start (default: all)")
    rep.add_argument("--time-samples", type=int, default=2, help="antithetic times per batch")
    rep.add_argument("--nfe", type=int, nargs="*", default=[64, 256])
    rep.add_argument("--num-samples", type=int, default=32, help="generated sequences per NFE, scored by AR")
    rep.add_argument("--exact-windows", type=int, default=32, help="held-out windows for AR's exact NLL")
    rep.add_argument("--jobs", type=int, default=2, help="runs evaluated at once, one thread each")
    one = sub.add_parser("evaluate", help="one run's part of the report (what `report` runs in a subprocess)")
    one.add_argument("run_dir")
    one.add_argument("--checkpoint", required=True, help="the run's checkpoint to evaluate")
    one.add_argument("--json", required=True, help="where its result goes")
    one.add_argument("--settings", required=True, help="evaluate_run's settings as JSON")
    one.add_argument("--scorer", default=None, help="the AR checkpoint that scores generated text")
    args = p.parse_args(argv)
    if args.command == "prepare":
        summary = prepare(Path(args.out))
        print(json.dumps(summary, indent=1))
        print(f"held-out unigram cross-entropy: {summary['heldout_unigram_bits_per_byte']:.4f} bits/byte "
              f"(= {summary['heldout_unigram_bits_per_byte'] * math.log(2):.4f} nats)")
    elif args.command == "queue":
        return 1 if queue(args.specs, Path(args.root)) else 0
    elif args.command == "progress":
        print(char_lm_report.progress_table(Path(args.root)))
    elif args.command == "evaluate":
        import torch

        from mdm_scale.sampling import load_scorer
        from parallel.files import atomic_write

        torch.set_num_threads(1)
        settings = json.loads(args.settings)
        result = char_lm_report.evaluate_run(Path(args.run_dir), Path(args.checkpoint),
                                             scorer=load_scorer(args.scorer) if args.scorer else None,
                                             **{**settings, "nfe": tuple(settings["nfe"])})
        atomic_write(args.json, json.dumps({**result, "settings": settings, "scorer": args.scorer}, indent=1))
    else:
        result = char_lm_report.report(Path(args.root), Path(args.out), batches=args.batches,
                                       time_samples=args.time_samples, nfe=tuple(args.nfe),
                                       num_samples=args.num_samples, exact_windows=args.exact_windows, jobs=args.jobs)
        print(char_lm_verdicts.markdown_tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
