"""Steps vs length study (issue 12): how many denoiser calls masked diffusion needs, per token and per sequence.

Theory (Feng et al., "Theoretical Benefit and Limitation of Diffusion Language Models"): near-optimal token-level
quality (per-token NLL / perplexity under the true source) needs a number of steps independent of the length L,
while a low sequence error rate needs steps growing linearly with L.

Source (experiments/steps/source.py): a sparse order-1 Markov chain over V = 8 symbols, K = 3 allowed successors
per state, stationary start; exact log-likelihood, entropy rate, and a correctness rule (no forbidden transition).

Models: `oracle` = the source's exact conditional p(x_i | z) (nearest visible neighbours and powers of P), so the
sampler is the only source of error (the theory's setting); `trained` = a tiny MDLM denoiser (2 layers, hidden 64,
byte tokenizer, symbols 'a'..'h') trained per length with a fixed token budget per step (batch = tokens / L).

Samplers (mdm_scale.sampling.generate, temperature 1, no nucleus):
    ancestral     the schedule's reveal probabilities on the uniform grid (= log-linear MDLM sampler)
    confidence    fixed counts per step on the uniform grid, most confident positions first
    eb            EB-sampler (entropy proxy) at several gamma; adaptive NFE (the batch's call count)
    (confidence runs up to NFE = L only: there it already reveals one position per call)
    beta          ancestral on a Beta(a, b) grid tuned per (L, NFE) by the TRUE-source NLL (tuning seed != report
                  seed, so the reported number is not the selection's maximum)

Metrics of each cell (num samples x L): per-token true NLL (forbidden transitions charged -log 1e-3) and its gap to
the source's exact E[-log p(x)]/L, token error rate (positions ending a forbidden transition), sequence error rate.

    scripts/in_venv.sh python experiments/steps/step_study.py --out runs/steps --plots docs/results
    scripts/in_venv.sh python experiments/steps/step_study.py --quick --out /tmp/steps      # smoke, < 60 s
    ... --samplers --merge A/report.json B/report.json --out runs/steps   # tables + plots of earlier runs only

Outputs: OUT/report.json, PLOTS/steps_<model>_vs_nfe.png, PLOTS/steps_<model>_vs_length.png (experiments/steps/
README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from source import OracleDenoiser, make_source  # noqa: E402

from common import (TrainSettings, limit_threads, machine_load, override_settings, run_config,  # noqa: E402
                    train_run, write_token_dataset)

OFFSET = ord("a")


# ------------------------------------------------------------------------------------------------- sampling
def sample_cell(denoiser, schedule, src, seq_len: int, *, policy: str, nfe: int, num_samples: int, seed: int,
                beta=(1.0, 1.0), gamma: float = 1.0, offset: int = OFFSET) -> dict:
    import torch

    from mdm_scale.sampling import generate

    start = time.perf_counter()
    out = generate(denoiser, schedule, num_samples=num_samples, seq_len=seq_len, nfe=nfe,
                   generator=torch.Generator().manual_seed(seed), policy=policy, beta=tuple(beta), eb_gamma=gamma)
    x = out.tokens.cpu().numpy() - offset
    return {**src.metrics(x), "nfe": int(out.nfe), "evaluations": int(out.evaluations),
            "seconds": time.perf_counter() - start}


def tune_beta(denoiser, schedule, src, seq_len: int, nfe: int, grid, num_samples: int, seed: int,
              offset: int = OFFSET) -> dict:
    """Grid search over (a, b) in grid x grid for the ancestral sampler, scored by the true-source NLL."""
    rows = []
    for a in grid:
        for b in grid:
            r = sample_cell(denoiser, schedule, src, seq_len, policy="ancestral", nfe=nfe, num_samples=num_samples,
                            seed=seed, beta=(a, b), offset=offset)
            rows.append({"beta": [a, b], "nll": r["nll"], "seq_error": r["seq_error"]})
    best = min(rows, key=lambda r: r["nll"])
    return {"best": best["beta"], "rows": rows}


def sweep(model_name: str, denoiser, schedule, src, seq_len: int, a) -> list[dict]:
    """Every sampler x NFE cell for one model and length."""
    mults = a.oracle_mults if model_name == "oracle" else a.trained_mults
    nfes = sorted({n for n in a.nfes if n < seq_len} | {m * seq_len for m in mults})
    n = a.oracle_samples if model_name == "oracle" else a.trained_samples
    offset = 0 if model_name == "oracle" else OFFSET  # the oracle uses ids 0..V-1 (mask V): a smaller tensor
    rows = []

    def add(sampler, policy, nfe, **kw):
        r = sample_cell(denoiser, schedule, src, seq_len, policy=policy, nfe=nfe, num_samples=n, seed=a.seed,
                        offset=offset, **kw)
        row = {"model": model_name, "seq_len": seq_len, "sampler": sampler, "nfe_requested": nfe, **kw, **r}
        rows.append(row)
        print(f"  {model_name:>7} L={seq_len:<4} {sampler:>10} nfe={row['nfe']:<5} nll_gap={row['nll_gap']:+.3f} "
              f"tok_err={row['token_error']:.4f} seq_err={row['seq_error']:.3f} ({row['seconds']:.1f}s)", flush=True)

    for nfe in nfes:
        if "ancestral" in a.samplers:
            add("ancestral", "ancestral", nfe)
        if "confidence" in a.samplers and nfe <= seq_len:  # one position per step at nfe = L: more calls are idle
            add("confidence", "confidence", nfe)
    for g in a.eb_gammas if "eb" in a.samplers else ():
        add("eb", "eb", seq_len, gamma=g)
    for nfe in a.tune_nfes if "beta" in a.samplers else ():
        tuned = tune_beta(denoiser, schedule, src, seq_len, nfe, a.beta_grid, n, seed=a.seed + 1, offset=offset)
        add("beta", "ancestral", nfe, beta=tuple(tuned["best"]))
        rows[-1]["tuning"] = tuned["rows"]
    return rows


# ------------------------------------------------------------------------------------------------- training
def train_model(src, seq_len: int, a, out: Path):
    """Tiny MDLM on source samples of length seq_len; returns (denoiser, schedule, train record)."""
    from mdm_scale.model import load_for_inference

    previous = sorted((Path(a.reuse_from or out) / f"run_L{seq_len}" / "checkpoints").glob("step_*"))
    if a.reuse and previous:
        _, _, model, _ = load_for_inference(previous[-1])
        print(f"  reusing {previous[-1]}", flush=True)
        return model["denoiser"], model["schedule"], {"seq_len": seq_len, "reused": str(previous[-1])}
    rng = np.random.default_rng(1000 + seq_len)
    n_train = max(a.train_tokens // seq_len, 64)
    data = out / f"data_L{seq_len}"
    write_token_dataset(data, {"train": src.sample(n_train, seq_len, rng),
                               "heldout": src.sample(max(4096 // seq_len, 16), seq_len, rng)}, offset=OFFSET)
    batch = max(a.tokens_per_step // seq_len, 4)
    s = TrainSettings(seq_len=seq_len, steps=a.steps, eval_every=a.steps, batch=batch, lr=a.lr, warmup=20,
                      eval_batches=1, eval_time_samples=2, layers=2, hidden=64, heads=4)
    override_settings(s, a, ("layers", "hidden", "heads"))
    cfg = run_config(["objective=mdlm"], data_dir=data, run_dir=out / f"run_L{seq_len}", name=f"steps_L{seq_len}",
                     seed=a.seed, s=s)
    res = train_run(cfg)
    _, _, model, _ = load_for_inference(res["checkpoint"])
    rec = {"seq_len": seq_len, "batch": batch, "steps": a.steps, "layers": s.layers, "hidden": s.hidden,
           "final_nelbo": res["final_nelbo"],
           "source_nll_per_token": src.expected_nll_per_token(seq_len), "wall_s": res["wall_s"],
           "checkpoint": res["checkpoint"]}
    print(f"  trained L={seq_len}: held-out NELBO {res['final_nelbo']:.4f} vs source {rec['source_nll_per_token']:.4f} "
          f"({res['wall_s']:.0f}s)", flush=True)
    return model["denoiser"], model["schedule"], rec


# -------------------------------------------------------------------------------------------------- summaries
def pick(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


QUALITY_TARGETS = (("nll_gap", 0.1), ("nll_gap", 0.05), ("seq_error", 0.5), ("seq_error", 0.15))


def equal_quality_table(rows, model: str, lengths, targets=QUALITY_TARGETS) -> list[dict]:
    """Issue 12 (a): for each quality target (true-NLL gap <= x, sequence error <= y) and length, the fewest
    denoiser calls with which each sampler reached it in the sweep (None: not within the NFEs tried)."""
    out = []
    for L in lengths:
        for metric, target in targets:
            row = {"model": model, "seq_len": L, "metric": metric, "target": target}
            for sampler in ("ancestral", "confidence", "eb"):
                cells = sorted(pick(rows, model=model, seq_len=L, sampler=sampler), key=lambda r: r["nfe"])
                hit = next((r for r in cells if r[metric] <= target), None)
                row[sampler] = hit["nfe"] if hit else None
                row[f"{sampler}_max_nfe"] = cells[-1]["nfe"] if cells else None
                if sampler == "eb" and hit:
                    row["eb_gamma"] = hit["gamma"]
            out.append(row)
    return out


def beta_table(rows, model: str, lengths, tune_nfes) -> list[dict]:
    out = []
    for L in lengths:
        for nfe in tune_nfes:
            u = pick(rows, model=model, seq_len=L, sampler="ancestral", nfe_requested=nfe)
            b = pick(rows, model=model, seq_len=L, sampler="beta", nfe_requested=nfe)
            if u and b:
                out.append({"model": model, "seq_len": L, "nfe": nfe, "uniform_nll": u[0]["nll"],
                            "uniform_seq_error": u[0]["seq_error"], "beta": list(b[0]["beta"]),
                            "beta_nll": b[0]["nll"], "beta_seq_error": b[0]["seq_error"],
                            "nll_improvement": u[0]["nll"] - b[0]["nll"]})
    return out


def theory_check(rows, model: str, lengths, fixed_nfes) -> dict:
    """Token NLL gap and sequence error vs L at fixed NFE (ancestral) and at NFE = L."""
    out = {}
    for nfe in list(fixed_nfes) + ["L", "4L"]:
        gaps, seqs, toks, ls = [], [], [], []
        for L in lengths:
            want = L if nfe == "L" else 4 * L if nfe == "4L" else nfe
            r = pick(rows, model=model, seq_len=L, sampler="ancestral", nfe_requested=want)
            if r:
                gaps.append(r[0]["nll_gap"]); seqs.append(r[0]["seq_error"]); toks.append(r[0]["token_error"])
                ls.append(L)
        out[str(nfe)] = {"lengths": ls, "nll_gap": gaps, "token_error": toks, "seq_error": seqs}
    return out


def md_tables(report: dict) -> str:
    lines = []
    for model in report["models"]:
        rows = [r for r in report["rows"] if r["model"] == model]
        lengths = sorted({r["seq_len"] for r in rows})
        lines += [f"\n#### {model}: true-source NLL gap (nats/token) / sequence error, by sampler and NFE\n",
                  "| L | sampler | NFE | NLL gap | token err | seq err |", "|---|---|---|---|---|---|"]
        for L in lengths:
            for r in sorted(pick(rows, seq_len=L), key=lambda r: (r["sampler"], r["nfe"])):
                tag = r["sampler"] + (f" g={r['gamma']:g}" if r["sampler"] == "eb" else "") + \
                    (f" ({r['beta'][0]:g},{r['beta'][1]:g})" if r["sampler"] == "beta" else "")
                lines.append(f"| {L} | {tag} | {r['nfe']} | {r['nll_gap']:+.3f} | {r['token_error']:.4f} | "
                             f"{r['seq_error']:.3f} |")
        lines += [f"\n#### {model}: (a) fewest denoiser calls (in the sweep) that reach each quality target\n",
                  "| L | target | ancestral (uniform) | confidence | EB |", "|---|---|---|---|---|"]
        for r in report["equal_quality"].get(model, []):
            def cell(name):
                if r[name] is None:
                    return f"> {r[name + '_max_nfe']}" if r[name + "_max_nfe"] else "-"
                return f"{r[name]}" + (f" (gamma {r['eb_gamma']:g})" if name == "eb" else "")
            lines.append(f"| {r['seq_len']} | {r['metric']} <= {r['target']:g} | {cell('ancestral')} | "
                         f"{cell('confidence')} | {cell('eb')} |")
        lines += [f"\n#### {model}: (b) tuned Beta grid vs uniform (log-linear) grid, ancestral\n",
                  "| L | NFE | uniform NLL | tuned (a, b) | tuned NLL | gain | seq err uniform -> tuned |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["beta"].get(model, []):
            lines.append(f"| {r['seq_len']} | {r['nfe']} | {r['uniform_nll']:.3f} | "
                         f"({r['beta'][0]:g}, {r['beta'][1]:g}) | {r['beta_nll']:.3f} | {r['nll_improvement']:+.3f} | "
                         f"{r['uniform_seq_error']:.3f} -> {r['beta_seq_error']:.3f} |")
    return "\n".join(lines)


def plot(report: dict, plots: Path) -> list[str]:
    from mdm_scale.plots import pyplot, save_figure

    plt = pyplot()
    written = []
    for model in report["models"]:
        rows = [r for r in report["rows"] if r["model"] == model]
        lengths = sorted({r["seq_len"] for r in rows})
        samplers = ["ancestral", "confidence", "eb"]
        metrics = [("nll_gap", "true NLL gap (nats/token)"), ("token_error", "token error rate"),
                   ("seq_error", "sequence error rate")]
        fig, axes = plt.subplots(len(metrics), len(samplers), figsize=(13, 10), squeeze=False)
        for j, sampler in enumerate(samplers):
            for i, (m, label) in enumerate(metrics):
                ax = axes[i, j]
                for L in lengths:
                    rr = sorted(pick(rows, seq_len=L, sampler=sampler), key=lambda r: r["nfe"])
                    if rr:
                        ax.plot([r["nfe"] for r in rr], [r[m] for r in rr], "o-", label=f"L={L}")
                ax.set_xscale("log", base=2)
                if m == "token_error":
                    ax.set_yscale("symlog", linthresh=1e-3)
                    ax.set_ylim(bottom=0)
                ax.set_title(f"{model}: {sampler}" if i == 0 else "")
                ax.set_xlabel("NFE (denoiser calls)")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
        axes[0, 0].legend()
        fig.tight_layout()
        written.append(save_figure(fig, plots / f"steps_{model}_vs_nfe.png", dpi=90))
        # direct theory view: vs L at fixed NFE and at NFE = L (ancestral)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for nfe, vals in report["theory"][model].items():
            if len(vals["lengths"]) > 1:
                axes[0].plot(vals["lengths"], vals["nll_gap"], "o-", label=f"NFE={nfe}")
                axes[1].plot(vals["lengths"], vals["seq_error"], "o-", label=f"NFE={nfe}")
        for ax, lab in zip(axes, ["true NLL gap (nats/token)", "sequence error rate"]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length L")
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
            ax.set_title(f"{model}, ancestral sampler")
        axes[1].legend()
        fig.tight_layout()
        written.append(save_figure(fig, plots / f"steps_{model}_vs_length.png", dpi=90))
    return written


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/steps")
    p.add_argument("--plots", default=None, help="directory for steps_*.png (default: OUT)")
    p.add_argument("--models", nargs="+", default=["oracle", "trained"], choices=["oracle", "trained"])
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--nfes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--oracle-mults", type=int, nargs="+", default=[1, 4], help="NFE = m * L cells (oracle)")
    p.add_argument("--trained-mults", type=int, nargs="+", default=[1], help="NFE = m * L cells (trained)")
    p.add_argument("--eb-gammas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--tune-nfes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--beta-grid", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--oracle-samples", type=int, default=128)
    p.add_argument("--trained-samples", type=int, default=32)
    p.add_argument("--oracle-jitter", type=float, default=1e-4,
                   help="random tie-breaking noise on the oracle's log-probabilities (source.OracleDenoiser)")
    p.add_argument("--num-symbols", type=int, default=8)
    p.add_argument("--allowed", type=int, default=3)
    p.add_argument("--source-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--train-tokens", type=int, default=1 << 19)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=None, help="trained denoiser depth (default 2)")
    p.add_argument("--hidden", type=int, default=None, help="trained denoiser width (default 64)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", nargs="*", default=["ancestral", "confidence", "eb", "beta"],
                   choices=["ancestral", "confidence", "eb", "beta"])
    p.add_argument("--reuse", action="store_true", help="trained: load OUT/run_L<L>/checkpoints if present")
    p.add_argument("--reuse-from", default=None, help="with --reuse: the OUT of the run that trained them")
    p.add_argument("--merge", nargs="*", default=[], help="report.json files whose cells join this report's tables")
    p.add_argument("--quick", action="store_true", help="smoke configuration (tests): seconds")
    a = p.parse_args(argv)
    if a.quick:
        a.lengths, a.nfes, a.oracle_mults, a.trained_mults = [8, 16], [2, 4], [1], [1]
        a.eb_gammas, a.tune_nfes, a.beta_grid = [1.0], [4], [1.0, 2.0]
        a.oracle_samples, a.trained_samples, a.steps, a.tokens_per_step, a.train_tokens = 16, 8, 10, 256, 4096
    limit_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = Path(a.plots) if a.plots else out
    start = time.time()
    src = make_source(a.num_symbols, a.allowed, a.source_seed)
    report = {"command": " ".join(["python", "experiments/steps/step_study.py", *(argv if argv is not None
                                                                                  else sys.argv[1:])]),
              "args": vars(a), "load_start": machine_load(),
              "source": {"P": src.P.tolist(), "pi": src.pi.tolist(), "entropy_rate": src.entropy_rate(),
                         "initial_entropy": src.initial_entropy(),
                         "expected_nll_per_token": {L: src.expected_nll_per_token(L) for L in a.lengths}},
              "models": [], "rows": [], "training": [], "wall_s": {}}
    print(f"source: V={a.num_symbols}, K={a.allowed}, entropy rate {src.entropy_rate():.4f} nats/token", flush=True)

    def finish():
        for key, fn in (("equal_quality", lambda m: equal_quality_table(report["rows"], m, a.lengths)),
                        ("beta", lambda m: beta_table(report["rows"], m, a.lengths, a.tune_nfes)),
                        ("theory", lambda m: theory_check(report["rows"], m, a.lengths, [n for n in (4, 16, 64)
                                                                                        if n in a.nfes]))):
            report[key] = {m: fn(m) for m in report["models"]}
        report["markdown"] = md_tables(report)
        report["wall_s"]["total"] = time.time() - start
        report["load_end"] = machine_load()
        (out / "report.json").write_text(json.dumps(report, indent=1, default=float))

    for path in a.merge:
        other = json.loads(Path(path).read_text())
        for m in other["models"]:
            if m not in report["models"]:
                report["models"].append(m)
        report["rows"] += [r for r in other["rows"]  # idle confidence cells (nfe > L) of older runs
                           if not (r["sampler"] == "confidence" and r["nfe_requested"] > r["seq_len"])]
        report["training"] += other.get("training", [])
        report.setdefault("merged", []).append({"path": path, "command": other["command"],
                                                "wall_s": other["wall_s"], "load_start": other["load_start"],
                                                "load_end": other.get("load_end")})
    from parallel.distributed import init_distributed

    init_distributed(device="cpu", seed=a.seed)
    if "oracle" in a.models and a.samplers:
        from mdm_scale.schedules.univariate import UnivariateSchedule

        t0 = time.time()
        oracle = OracleDenoiser(src, vocab_size=a.num_symbols, offset=0, max_seq_len=max(a.lengths),
                                jitter=a.oracle_jitter, seed=a.seed)
        schedule = UnivariateSchedule("loglinear", 1e-3)
        report["models"] += [] if "oracle" in report["models"] else ["oracle"]
        for L in a.lengths:
            report["rows"] += sweep("oracle", oracle, schedule, src, L, a)
            finish()
        report["wall_s"]["oracle"] = time.time() - t0
    if "trained" in a.models and a.samplers:
        t0 = time.time()
        report["models"] += [] if "trained" in report["models"] else ["trained"]
        for L in a.lengths:
            denoiser, schedule, rec = train_model(src, L, a, out)
            t1 = time.time()
            report["rows"] += sweep("trained", denoiser, schedule, src, L, a)
            rec["sampling_wall_s"] = time.time() - t1
            report["training"].append(rec)
            finish()
        report["wall_s"]["trained"] = time.time() - t0
    finish()
    report["plots"] = plot(report, plots)
    finish()
    print(report["markdown"])
    print(f"wall {report['wall_s']['total']:.0f} s; report {out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
