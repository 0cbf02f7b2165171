"""The character-level benchmark's report: what `char_lm.py report`, `evaluate` and `progress` measure on the run
directories (docs/results.md, "Language (character level)"). Nothing here trains; everything reads runs. The
statistics over the measured runs (per-objective rows, verdicts, tables) are in char_lm_verdicts.py.

Held-out NELBO over the whole split with its standard error (and the unbiased order form for learned schedules),
the learning curves from the training evaluations, generation scored by the project's AR model, the learned order
(mean reveal time by position, and the paper's Figure 4: backward velocity against the denoiser's confidence), and
the stability evidence (largest logged gradient norms). Each run is evaluated in its own one-thread process and
cached, so a report stopped by a session's end resumes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

EXPERIMENTS = Path(__file__).resolve().parent
sys.path.insert(0, str(EXPERIMENTS.parent))
sys.path.insert(0, str(EXPERIMENTS))

from char_lm_verdicts import markdown_tables, summarise, verdicts  # noqa: E402

ORDER_WINDOWS = 64  # held-out windows, evenly spaced over the split, that the learned order is averaged over
EVAL_KEYS = ("eval/nelbo", "eval/nelbo_order_form")  # time form; the unbiased order form of a learned schedule

COLORS = {"mdlm": "tab:gray", "ar": "tab:orange", "mdm_ls": "tab:blue", "lomdm_paper": "tab:purple",
          "lomdm": "tab:red", "mdm_ls order form": "tab:cyan", "lomdm_paper order form": "tab:pink",
          "lomdm order form": "tab:brown", "lomdm_paper_fixed": "tab:green",
          "lomdm_paper_fixed order form": "tab:olive"}  # the unbiased curves of learned schedules in their own colours


def bits(nats: float) -> float:
    return nats / math.log(2)


def objective_of(run_dir: Path) -> str:
    """Run directories are named <objective>-s<seed> (the commands in docs/results.md)."""
    return run_dir.name.rsplit("-s", 1)[0]


def learning_curve(evals: dict[int, dict[str, float]], tokens_per_step: int,
                   key: str = "eval/nelbo") -> list[tuple[int, float]]:
    """[(tokens, held-out bits/byte)] from the training evaluations (`held_out_evals`: a fixed held-out sample and
    noise seed). key "eval/nelbo_order_form": the unbiased order form that learned schedules also log
    (mdm_scale.evaluation.truncation_biased), from the step it was first logged on."""
    return [(step * tokens_per_step, row[key]) for step, row in sorted(evals.items()) if key in row]


def held_out_evals(metrics: list[dict]) -> dict[int, dict[str, float]]:
    """{step: {key: bits/byte}} of the training evaluations in a run's metrics (mdm_scale.metrics.read_metrics; the
    last one logged per step, so a step evaluated again after a resume counts once)."""
    evals: dict[int, dict[str, float]] = {}
    for row in metrics:
        for key in EVAL_KEYS:
            if key in row:
                evals.setdefault(int(row["step"]), {})[key] = bits(float(row[key]))
    return evals


def gradient_norms(metrics: list[dict], warmup_steps: int) -> dict:
    """The logged gradient norms (before clipping; logged every logging.log_every steps), global, the learned
    schedule's part and the denoiser's part sqrt(global^2 - schedule^2): the largest over the run, and the largest
    and the median after the warm-up. The stability evidence of issue 26: the schedule's part is clipped on its own
    (optimizer.schedule_grad_clip), so its spikes move the schedule's weights by at most the clip, and the
    denoiser's part says what the denoiser sees. A run that completes had no non-finite step (train.nonfinite=stop
    ends a run at the first)."""
    rows = [r for r in metrics if "train/grad_norm" in r]
    out = {"logged_steps": len(rows)}
    parts = {"grad_norm": [(int(r["step"]), float(r["train/grad_norm"])) for r in rows]}
    if any("train/grad_norm_schedule" in r for r in rows):
        parts["grad_norm_schedule"] = [(int(r["step"]), float(r.get("train/grad_norm_schedule", 0.0))) for r in rows]
        parts["grad_norm_denoiser"] = [(step, math.sqrt(max(g * g - s * s, 0.0))) for (step, g), (_, s) in
                                       zip(parts["grad_norm"], parts["grad_norm_schedule"])]
    for name, values in parts.items():
        if values:
            after = [v for step, v in values if step > warmup_steps]
            out[f"max_{name}"] = max(v for _, v in values)
            out[f"max_{name}_after_warmup"] = max(after, default=None)
            out[f"median_{name}_after_warmup"] = float(np.median(after)) if after else None
    return out


def heldout_windows(cfg, count: int):
    """`count` held-out windows [count, L] evenly spaced over the whole split (its start is one document)."""
    import torch

    from data_pipeline.datasets import open_split
    from data_pipeline.tokenizer import load_tokenizer

    split = open_split(Path(cfg.data.path), "heldout", load_tokenizer(cfg.data.tokenizer), seq_len=cfg.data.seq_len,
                       batch_size=1, seed=0, shuffle=False)
    if count > split.num_samples:
        raise ValueError(f"{count} held-out windows asked for, the split has {split.num_samples}")
    index = np.linspace(0, split.num_samples - 1, count).round().astype(np.int64)
    return torch.as_tensor(np.asarray(split.source.get(index)).astype(np.int64))


def order_summary(cfg, checkpoint: Path, x) -> tuple[dict, np.ndarray] | None:
    """For learned schedules: mean reveal time E[tau_i] = w_i / (w_i + 1) by position (averaged over the held-out
    windows `x` for LoMDM) and its Spearman correlation with the position, with the per-window exponents [n, L]
    (the plot's; kept out of report.json). Generation runs t = 1 -> 0, so a large E[tau_i] means revealed early: a
    correlation of -1 is left to right, +1 right to left, 0 no positional order. None for fixed schedules."""
    from common import learned_exponents, spearman

    from mdm_scale.plots import mean_reveal_time

    w = learned_exponents(cfg, checkpoint.parent, x.numpy(), per_sample=True)
    if w is None:
        return None
    reveal = mean_reveal_time(w)
    return {"windows": len(x), "mean_reveal_time": reveal.tolist(),
            "spearman_reveal_time_vs_position": spearman(reveal, np.arange(len(reveal))),
            "reveal_time_spread": float(reveal.max() - reveal.min())}, np.asarray(w)


def confidence_agreement(checkpoint: Path, x, t: float = 0.5, seed: int = 0) -> dict | None:
    """LoMDM only (the paper's Figure 4): at z_t (time t, the forward process with the learned w), Spearman
    correlation, per sequence over masked positions, between the backward scheduler's velocity A_hat_i = w_hat_i / t
    and the denoiser's confidence max_v p(v | z_t); averaged over sequences."""
    import torch

    from common import spearman

    from mdm_scale.model import load_for_inference

    cfg, _, model, _ = load_for_inference(checkpoint)
    denoiser, schedule = model["denoiser"], model["schedule"]
    if not schedule.needs_clean_features:
        return None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clean = denoiser(x, torch.zeros(x.shape[0]))
        masking = schedule.masking(torch.full((x.shape[0],), t, dtype=torch.float64), x.shape[1],
                                   denoiser.scheduler_logits("forward_scheduler", clean))
        masked = torch.rand(x.shape, generator=g, dtype=torch.float64) < masking.mask_prob
        z = torch.where(masked, torch.full_like(x, denoiser.mask_id), x)
        hidden = denoiser(z, torch.full((x.shape[0],), t))
        w_hat = schedule.backward_exponents(denoiser.scheduler_logits("backward_scheduler", hidden))
        logits = denoiser.vocab_logits(hidden.reshape(-1, hidden.shape[-1])).float()
        confidence = logits.softmax(-1).max(-1).values.reshape(x.shape)  # [n, L]
    rho = [spearman(w_hat[i][masked[i]].numpy(), confidence[i][masked[i]].numpy())
           for i in range(x.shape[0]) if masked[i].sum() > 2]
    return {"t": t, "spearman_velocity_vs_confidence": float(np.mean(rho)), "sequences": len(rho)}


def evaluate_run(run_dir: Path, checkpoint: Path, *, batches: int | None, time_samples: int, scorer,
                 nfe: tuple[int, ...], num_samples: int, exact_windows: int) -> dict:
    """One checkpoint of a run: held-out NELBO (the first `batches` batches, None = the whole split; `time_samples`
    antithetic times each; with its standard error), exact NLL for AR, generation NLL under the AR scorer at each
    NFE, the backward velocity against the denoiser's confidence; with the run's training curves from its
    metrics. (The learned order is measured by `report` itself, cheaply, on windows spread over the whole split.)"""
    import torch

    from mdm_scale.config import load_config
    from mdm_scale.evaluation import evaluate_checkpoint, exact_ar_nll, truncation_biased
    from mdm_scale.metrics import read_metrics
    from mdm_scale.model import load_for_inference
    from mdm_scale.sampling import generate, generation_nll, token_entropy
    from parallel.checkpoint import checkpoint_step

    cfg = load_config(run_dir / "config.yaml")
    tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.data.grad_accumulation
    evals = held_out_evals(read_metrics(run_dir))
    out = {"run_dir": str(run_dir), "objective": objective_of(run_dir), "seed": cfg.train.seed,
           "checkpoint": str(checkpoint), "step": checkpoint_step(checkpoint),
           "complete": checkpoint_step(checkpoint) >= cfg.train.steps,
           "curve": learning_curve(evals, tokens_per_step)}
    ev = evaluate_checkpoint(str(checkpoint), max_batches=batches, time_samples=time_samples, exact_ar=False)
    out.update(nelbo=ev["nelbo"], nelbo_stderr=ev["nelbo_stderr"], bits_per_byte=bits(ev["nelbo"]),
               bits_stderr=bits(ev["nelbo_stderr"]), eval_batches=ev["batches"], time_samples=time_samples)
    order_curve = learning_curve(evals, tokens_per_step, "eval/nelbo_order_form")
    if order_curve:
        out["curve_order_form"] = order_curve
    if truncation_biased(cfg.objective):
        # the time form's t_min drops t_min^w of each position's loss; the order form at t_min 0 does not
        unbiased = evaluate_checkpoint(str(checkpoint), max_batches=batches, time_samples=time_samples,
                                       exact_ar=False, estimator="order")
        out.update(order_form_bits_per_byte=bits(unbiased["nelbo"]),
                   order_form_bits_stderr=bits(unbiased["nelbo_stderr"]))
    _, tokenizer, model, _ = load_for_inference(checkpoint)
    x = heldout_windows(cfg, max(exact_windows, 16))
    if out["objective"] == "ar":
        nll = exact_ar_nll(model["denoiser"], model["schedule"], x[:exact_windows])
        out["exact_bits_per_byte"] = bits(nll.sum().item() / x[:exact_windows].numel())
    if scorer is not None:
        out["generation"] = {}
        # AR reveals one position per call: with fewer calls than positions it would reveal several at once, each
        # blind to the others, which is not autoregressive generation. It is scored at NFE >= L only.
        for steps in (n for n in nfe if out["objective"] != "ar" or n >= cfg.data.seq_len):
            sample = generate(model["denoiser"], model["schedule"], num_samples=num_samples, seq_len=cfg.data.seq_len,
                              nfe=steps, generator=torch.Generator().manual_seed(0), policy="ancestral")
            score = generation_nll(sample.tokens, scorer, tokenizer)
            out["generation"][str(steps)] = {"bits_per_byte": bits(score["nll"]),
                                             "bits_stderr": bits(score["nll_stderr"]),
                                             "token_entropy": token_entropy(sample.tokens),
                                             "text": tokenizer.decode(sample.tokens[0].tolist())[:200]}
    out["confidence"] = confidence_agreement(checkpoint, x[:16])
    return out


def progress_table(root: Path) -> str:
    """The training-time curves of every run under `root` as a markdown table (bits/byte by step; "a / b" = time
    form / unbiased order form where a learned schedule logs both), for docs/results.md between sessions. Reads
    only the runs' logs: nothing is evaluated, so it is safe while the runs train."""
    from mdm_scale.metrics import read_metrics
    from mdm_scale.run_queue import training_progress

    rows, steps = [], set()
    for run_dir in sorted(p for p in root.iterdir() if (p / "config.yaml").exists()):
        cells = {step: " / ".join(f"{row[k]:.3f}" for k in EVAL_KEYS if k in row)
                 for step, row in held_out_evals(read_metrics(run_dir)).items() if "eval/nelbo" in row}
        step, total = training_progress(run_dir)
        state = "complete" if step >= total else f"checkpoint at step {step}"
        rows.append((f"{run_dir.name} ({state})", cells))
        steps |= set(cells)
    columns = sorted(steps)
    lines = ["| run | " + " | ".join(map(str, columns)) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells.get(c, "-") for c in columns) + " |" for name, cells in rows]
    return "\n".join(lines)


def evaluate_runs(run_dirs: list[Path], cache: Path, *, settings: dict, scorer: str | None, jobs: int = 1,
                  poll_s: float = 2.0) -> list[dict]:
    """evaluate_run for each run's newest checkpoint (as of this call) in its own one-thread process (`char_lm.py
    evaluate`, through mdm_scale.run_queue, `jobs` at a time), each result written to cache/<run>.json. A report
    stopped midway (a session's end) resumes, and a run whose checkpoint, settings and scorer are those of its
    cached result is not evaluated again. Runs still training are evaluated as they are now (not waited for)."""
    from mdm_scale.run_queue import run_in_order
    from parallel.checkpoint import list_checkpoints

    cache.mkdir(parents=True, exist_ok=True)
    newest = {d: str(list_checkpoints(d / "checkpoints")[-1]) for d in run_dirs}

    def cached(run_dir: Path) -> bool:
        path = cache / f"{run_dir.name}.json"
        result = json.loads(path.read_text()) if path.exists() else None
        return bool(result) and (result["checkpoint"], result["settings"], result["scorer"]) == (
            newest[run_dir], settings, scorer)

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, str(EXPERIMENTS / "char_lm.py"), "evaluate", str(run_dir), "--checkpoint",
                newest[run_dir], "--json", str(cache / f"{run_dir.name}.json"), "--settings", json.dumps(settings),
                *(["--scorer", scorer] if scorer else [])]

    failed = run_in_order([(d, command(d), cache / f"{d.name}.log") for d in run_dirs], jobs=jobs, done=cached,
                          exclusive=False, poll_s=poll_s, report=lambda line: print(line, flush=True))
    if failed:
        raise RuntimeError(f"{failed} run(s) could not be evaluated: see {cache}/<run>.log")
    return [json.loads((cache / f"{d.name}.json").read_text()) for d in run_dirs]


def report(root: Path, out: Path, *, batches: int | None, time_samples: int, nfe: tuple[int, ...], num_samples: int,
           exact_windows: int, jobs: int = 1) -> dict:
    """Every complete run under `root` evaluated (evaluate_runs: resumable, `jobs` at once) and summarised into
    out/report.json, out/tables.md and the plots; the first AR run's checkpoint scores generated text. Runs still
    short of their train.steps are left out (the table compares equal tokens), and listed with their step."""
    from mdm_scale.config import load_config
    from mdm_scale.metrics import read_metrics
    from mdm_scale.plots import reveal_time_by_position, training_curves
    from mdm_scale.run_queue import training_progress
    from parallel.checkpoint import list_checkpoints

    configs = {p: load_config(p / "config.yaml") for p in sorted(root.iterdir()) if (p / "config.yaml").exists()}
    progress = {p: training_progress(p, cfg.train.steps) for p, cfg in configs.items()}
    run_dirs = [p for p, (step, steps) in progress.items() if step >= steps]
    left_out = {p.name: step for p, (step, steps) in progress.items() if step < steps}
    for name, step in left_out.items():
        print(f"{name}: left out, still training (checkpoint at step {step})", flush=True)
    ar = [p for p in run_dirs if objective_of(p) == "ar"]
    scorer = str(list_checkpoints(ar[0] / "checkpoints")[-1]) if ar else None
    settings = {"batches": batches, "time_samples": time_samples, "nfe": list(nfe), "num_samples": num_samples,
                "exact_windows": exact_windows}
    runs = evaluate_runs(run_dirs, out / "runs", settings=settings, scorer=scorer, jobs=jobs)
    exponents = {}
    for run_dir, r in zip(run_dirs, runs):  # cheap, so measured at every report: a cached evaluation stays valid
        cfg = configs[run_dir]
        r["gradient_norms"] = gradient_norms(read_metrics(run_dir), cfg.optimizer.warmup_steps)
        order = order_summary(cfg, Path(r["checkpoint"]), heldout_windows(cfg, ORDER_WINDOWS))
        r["order"] = order[0] if order else None
        if order:
            exponents[f"{r['objective']} s{r['seed']}"] = order[1]
    summary = summarise(runs)
    result = {"runs": runs, "summary": summary, "verdicts": verdicts(summary, runs), "scorer": scorer,
              "left_out_still_training": left_out}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "tables.md").write_text(markdown_tables(result))
    curves = {f"{r['objective']} s{r['seed']}": r["curve"] for r in runs}
    curves.update({f"{r['objective']} order form s{r['seed']}": r["curve_order_form"] for r in runs
                   if r.get("curve_order_form")})
    training_curves(curves, out / "heldout_bits.png",
                    title="Character level: held-out NELBO during training", ylabel="bits/byte (NELBO bound)",
                    xlabel="training bytes", colors=COLORS, zoom=(3.0, 4.0))
    if exponents:
        reveal_time_by_position(exponents, out / "learned_order.png", title="Learned order (character level)",
                                colors=COLORS, right_to_left_reference=False)  # no order is best a priori here
    return result
