"""The character-level benchmark's report: what `char_lm.py report`, `evaluate` and `progress` measure on the run
directories (docs/results.md, "Language (character level)"). Nothing here trains; everything reads runs.

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


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target` (linear between evaluations); None if it never does."""
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            return t0 + (t1 - t0) * (v0 - target) / (v0 - v1) if v0 > target else t0
    return None


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


def order_summary(cfg, checkpoint: Path, x) -> dict | None:
    """For learned schedules: mean reveal time E[tau_i] = w_i / (w_i + 1) by position (averaged over held-out
    sequences for LoMDM) and its Spearman correlation with the position. Generation runs t = 1 -> 0, so a large
    E[tau_i] means revealed early: a correlation of -1 is left to right, +1 right to left, 0 no positional order."""
    from common import learned_exponents, spearman

    from mdm_scale.plots import mean_reveal_time

    w = learned_exponents(cfg, checkpoint.parent, x.numpy(), per_sample=True)
    if w is None:
        return None
    reveal = mean_reveal_time(w)
    return {"mean_reveal_time": reveal.tolist(), "exponents_per_sample": np.asarray(w).tolist()[:4],
            "spearman_reveal_time_vs_position": spearman(reveal, np.arange(len(reveal))),
            "reveal_time_spread": float(reveal.max() - reveal.min())}


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
    NFE, the learned order; with the run's training curves and gradient norms from its metrics."""
    import torch

    from mdm_scale.config import load_config
    from mdm_scale.evaluation import evaluate_checkpoint, exact_ar_nll, truncation_biased
    from mdm_scale.metrics import read_metrics
    from mdm_scale.model import load_for_inference
    from mdm_scale.sampling import generate, generation_nll, token_entropy
    from parallel.checkpoint import checkpoint_step

    cfg = load_config(run_dir / "config.yaml")
    tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.data.grad_accumulation
    metrics = read_metrics(run_dir)
    evals = held_out_evals(metrics)
    out = {"run_dir": str(run_dir), "objective": objective_of(run_dir), "seed": cfg.train.seed,
           "checkpoint": str(checkpoint), "step": checkpoint_step(checkpoint),
           "complete": checkpoint_step(checkpoint) >= cfg.train.steps,
           "curve": learning_curve(evals, tokens_per_step),
           "gradient_norms": gradient_norms(metrics, cfg.optimizer.warmup_steps)}
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
    out["order"] = order_summary(cfg, checkpoint, x[:16])
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


def unbiased_bits(run: dict) -> tuple[float, float]:
    """(bits/byte, its stderr) to compare objectives by: the order form where the run's own estimator is the
    truncated time form of a learned schedule (optimistic), the run's own value otherwise."""
    if "order_form_bits_per_byte" in run:
        return run["order_form_bits_per_byte"], run["order_form_bits_stderr"]
    return run["bits_per_byte"], run["bits_stderr"]


def summarise(runs: list[dict]) -> dict:
    """Per objective: mean +- std over seeds of the held-out bits/byte (unbiased: `unbiased_bits`; the run's own
    estimator's value beside it), its mean stderr, the learning-speed ratio against MDLM's final value, generation
    bits/byte per NFE."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["objective"], []).append(r)
    mdlm_final = np.mean([unbiased_bits(r)[0] for r in by.get("mdlm", [])]) if "mdlm" in by else None
    mdlm_curve_final = np.mean([r["curve"][-1][1] for r in by.get("mdlm", [])]) if "mdlm" in by else None
    mdlm_tokens = np.mean([r["curve"][-1][0] for r in by.get("mdlm", [])]) if "mdlm" in by else None
    table = {}
    for objective, rs in by.items():
        values = np.array([unbiased_bits(r)[0] for r in rs])
        row = {"seeds": [r["seed"] for r in rs], "bits_per_byte": values.tolist(),
               "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
               "stderr": float(np.mean([unbiased_bits(r)[1] for r in rs])),
               "stderr_of_mean": seed_mean_stderr(values.tolist(), [unbiased_bits(r)[1] for r in rs]),
               "own_estimator_bits_per_byte": [r["bits_per_byte"] for r in rs],
               "complete": all(r["complete"] for r in rs)}
        if mdlm_curve_final is not None:
            reach = [tokens_to_reach(r["curve"], mdlm_curve_final) for r in rs]
            row["fraction_of_mdlm_tokens_to_reach_its_final"] = [None if t is None else t / mdlm_tokens for t in reach]
            if any("curve_order_form" in r for r in rs):  # the unbiased curve, from where it was first logged
                reach = [tokens_to_reach(r.get("curve_order_form", []), mdlm_curve_final) for r in rs]
                row["fraction_of_mdlm_tokens_to_reach_its_final_order_form"] = [
                    None if t is None else t / mdlm_tokens for t in reach]
        if mdlm_final is not None:
            row["minus_mdlm"] = float(values.mean() - mdlm_final)
        row["estimator"] = "order form (t_min = 0)" if any("order_form_bits_per_byte" in r for r in rs) else "own"
        if any("exact_bits_per_byte" in r for r in rs):
            row["exact_bits_per_byte"] = [r.get("exact_bits_per_byte") for r in rs]
        if rs[0].get("generation"):  # per seed, their mean and its standard error (seed_mean_stderr)
            per_seed = {n: [r["generation"][n]["bits_per_byte"] for r in rs] for n in rs[0]["generation"]}
            row["generation_bits_per_seed"] = per_seed
            row["generation_bits_per_byte"] = {n: float(np.mean(v)) for n, v in per_seed.items()}
            row["generation_bits_stderr"] = {
                n: seed_mean_stderr(v, [r["generation"][n]["bits_stderr"] for r in rs]) for n, v in per_seed.items()}
        table[objective] = row
    return table


def seed_mean_stderr(values: list[float], stderrs: list[float]) -> float:
    """Standard error of a mean over seeds of measured values (each with its own standard error): the larger of the
    seed spread's std / sqrt(n) and the measurements' sqrt(sum se_i^2) / n, since with 2-3 seeds the spread alone
    can be small by chance. One seed: its measurement's standard error (the seed variance is then unknown, and a
    verdict says so). NaN when a measurement has none."""
    n = len(values)
    measured = math.sqrt(sum(se * se for se in stderrs)) / n
    if n == 1 or not math.isfinite(measured):
        return measured
    return max(float(np.std(values, ddof=1)) / math.sqrt(n), measured)


def difference(a: float, se_a: float, b: float, se_b: float) -> dict:
    """a - b with its standard error and the two-standard-error reading: "lower", "higher", "level", or "no
    standard error" (one evaluation batch, or a missing one)."""
    diff, se = a - b, math.hypot(se_a, se_b)
    reading = ("no standard error" if not math.isfinite(se) else "lower" if diff < -2 * se else
               "higher" if diff > 2 * se else "level")
    return {"difference": diff, "stderr": se, "reading": reading}


def _lower_is_confirmed(reading: str) -> str:
    return {"lower": "confirmed at this scale", "higher": "not confirmed: higher",
            "level": "not confirmed: level within two standard errors",
            "no standard error": "not measurable: no standard error"}[reading]


def verdicts(summary: dict, runs: list[dict], learned: str = "lomdm_paper") -> dict[str, dict]:
    """The paper's claims for `learned` against MDLM, each read off the numbers by a rule fixed before the runs
    (a difference counts when it exceeds two standard errors, each side's from seed_mean_stderr):
      perplexity       held-out bits/byte (unbiased order form): confirmed if lower than MDLM's, not if higher or
                       level;
      learning speed   the fraction of MDLM's bytes at which each seed's unbiased held-out curve first reaches
                       MDLM's final value: confirmed if every seed gets there before MDLM does (< 1), not if any
                       seed never gets there within the budget;
      generation       AR-scored bits/byte of generated text at each NFE: confirmed at an NFE if lower than MDLM's;
      learned order    the paper's Figure 4: the backward velocity's rank correlation with the denoiser's confidence
                       is positive in every seed;
      zero-shot        not measurable here (the paper's 7 zero-shot sets are word-level benchmarks of a GPT-2-sized
                       model; a 3 M-parameter byte model has no meaningful score on them)."""
    if learned not in summary or "mdlm" not in summary:
        return {}
    row, mdlm = summary[learned], summary["mdlm"]
    single = 1 in (len(row["seeds"]), len(mdlm["seeds"]))
    one_seed = " (one seed on a side: the seed variance is unknown)" if single else ""
    out = {}
    d = difference(row["mean"], row["stderr_of_mean"], mdlm["mean"], mdlm["stderr_of_mean"])
    out["perplexity"] = {**d, "verdict": _lower_is_confirmed(d["reading"]) + one_seed}
    fractions = row.get("fraction_of_mdlm_tokens_to_reach_its_final_order_form",
                        row.get("fraction_of_mdlm_tokens_to_reach_its_final"))
    if fractions:
        reached = [f for f in fractions if f is not None]
        out["learning speed"] = {"fractions": fractions, "verdict": (
            "confirmed at this scale" if len(reached) == len(fractions) and max(reached) < 1 else
            f"not confirmed: {len(fractions) - len(reached)} of {len(fractions)} seeds never reach MDLM's final value"
            if len(reached) < len(fractions) else "not confirmed: no faster than MDLM")}
    for n, value in row.get("generation_bits_per_byte", {}).items():
        if n in mdlm.get("generation_bits_per_byte", {}):
            d = difference(value, row["generation_bits_stderr"][n], mdlm["generation_bits_per_byte"][n],
                           mdlm["generation_bits_stderr"][n])
            out[f"generation NFE {n}"] = {**d, "verdict": _lower_is_confirmed(d["reading"])}
    rho = [(r.get("confidence") or {}).get("spearman_velocity_vs_confidence") for r in runs
           if r["objective"] == learned]
    if rho and all(v is not None for v in rho):
        out["learned order (Figure 4)"] = {"spearman_velocity_vs_confidence": rho, "verdict": (
            "confirmed at this scale" if min(rho) > 0 else "not confirmed: not positive in every seed")}
    out["zero-shot"] = {"verdict": "not measurable here"}
    return out


def _numbers(values, fmt: str = "{:.3f}") -> str:
    return " / ".join("-" if v is None else fmt.format(v) for v in values)


def markdown_tables(result: dict) -> str:
    """The report as the markdown tables docs/results.md holds: the comparison per objective, then the learned order
    per run. Every number is read from `result` (report.json), none is recomputed."""
    summary = result["summary"]
    nfe = sorted({n for row in summary.values() for n in row.get("generation_bits_per_byte", {})}, key=int)
    lines = ["| objective | seeds | held-out bits/byte (mean +- seed std) | stderr | own estimator | minus MDLM "
             "| MDLM's final reached at (fraction of its bytes) | " + " | ".join(f"generation NFE {n} (AR's bits/byte +- se)" for n in nfe)
             + " |", "|---|---|---|---|---|---|---|" + "---|" * len(nfe)]
    for objective, row in summary.items():
        spread = "" if row["std"] is None else f" +- {row['std']:.3f}"
        reach = _numbers(row.get("fraction_of_mdlm_tokens_to_reach_its_final", []), "{:.2f}")
        if "fraction_of_mdlm_tokens_to_reach_its_final_order_form" in row:
            reach += " (order form: " + _numbers(row["fraction_of_mdlm_tokens_to_reach_its_final_order_form"],
                                                 "{:.2f}") + ")"
        own = _numbers(row["own_estimator_bits_per_byte"]) if row["estimator"] != "own" else "same"
        minus = "-" if row.get("minus_mdlm") is None else f"{row['minus_mdlm']:+.3f}"
        generation = [f"{row['generation_bits_per_byte'][n]:.3f} +- {row['generation_bits_stderr'][n]:.3f}"
                      if n in row.get("generation_bits_per_byte", {}) else "-" for n in nfe]
        lines.append(f"| {objective}{'' if row['complete'] else ' (incomplete)'} | {len(row['seeds'])} "
                     f"| {row['mean']:.3f}{spread} ({row['estimator']}) | {row['stderr']:.3f} | {own} | {minus} "
                     f"| {reach or '-'} | " + " | ".join(generation) + " |")
    orders = [r for r in result["runs"] if r.get("order")]
    if orders:
        lines += ["", "| run | Spearman(mean reveal time, position) | reveal-time spread "
                      "| Spearman(backward velocity, denoiser confidence) at t = 0.5 |", "|---|---|---|---|"]
        for r in orders:
            confidence = r.get("confidence") or {}
            rho = confidence.get("spearman_velocity_vs_confidence")
            lines.append(f"| {r['objective']} s{r['seed']} | {r['order']['spearman_reveal_time_vs_position']:+.3f} "
                         f"| {r['order']['reveal_time_spread']:.3f} | {'-' if rho is None else f'{rho:+.3f}'} |")
    lines += ["", "| run | step | logged gradient norm after warm-up, largest (median): global | denoiser's part "
                  "| learned schedule's part (clipped on its own) |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        norms = r["gradient_norms"]
        cells = []
        for part in ("grad_norm", "grad_norm_denoiser", "grad_norm_schedule"):
            largest, median = norms.get(f"max_{part}_after_warmup"), norms.get(f"median_{part}_after_warmup")
            cells.append("-" if largest is None else f"{largest:.2f} ({median:.2f})")
        lines.append(f"| {r['objective']} s{r['seed']} | {r['step']}{'' if r['complete'] else ' (incomplete)'} | "
                     + " | ".join(cells) + " |")
    claims = verdicts(result["summary"], result["runs"])
    if claims:
        lines += ["", "| claim of the paper (lomdm_paper against MDLM) | numbers | verdict |", "|---|---|---|"]
        for claim, v in claims.items():
            if "difference" in v:
                numbers = f"{v['difference']:+.3f} +- {v['stderr']:.3f} bits/byte"
            elif "fractions" in v:
                numbers = "fraction of MDLM's bytes: " + _numbers(v["fractions"], "{:.2f}")
            elif "spearman_velocity_vs_confidence" in v:
                numbers = "Spearman per seed: " + _numbers(v["spearman_velocity_vs_confidence"], "{:+.3f}")
            else:
                numbers = "-"
            lines.append(f"| {claim} | {numbers} | {v['verdict']} |")
    if result.get("left_out_still_training"):
        lines += ["", "Left out, still training: " + ", ".join(
            f"{name} (step {step})" for name, step in result["left_out_still_training"].items()) + "."]
    return "\n".join(lines) + "\n"


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

    progress = {p: training_progress(p) for p in sorted(root.iterdir()) if (p / "config.yaml").exists()}
    run_dirs = [p for p, (step, steps) in progress.items() if step >= steps]
    left_out = {p.name: step for p, (step, steps) in progress.items() if step < steps}
    for name, step in left_out.items():
        print(f"{name}: left out, still training (checkpoint at step {step})", flush=True)
    ar = [p for p in run_dirs if objective_of(p) == "ar"]
    scorer = str(list_checkpoints(ar[0] / "checkpoints")[-1]) if ar else None
    settings = {"batches": batches, "time_samples": time_samples, "nfe": list(nfe), "num_samples": num_samples,
                "exact_windows": exact_windows}
    runs = evaluate_runs(run_dirs, out / "runs", settings=settings, scorer=scorer, jobs=jobs)
    for r in runs:  # read from the logs at every report (cheap), so a cached evaluation needs no rerun for them
        r["gradient_norms"] = gradient_norms(read_metrics(Path(r["run_dir"])),
                                             load_config(Path(r["run_dir"]) / "config.yaml").optimizer.warmup_steps)
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
                    xlabel="training bytes", colors=COLORS)
    orders = {f"{r['objective']} s{r['seed']}": np.asarray(r["order"]["exponents_per_sample"])
              for r in runs if r["order"]}
    if orders:
        reveal_time_by_position(orders, out / "learned_order.png", title="Learned order (character level)",
                                colors=COLORS)
    return result
