"""The character-level benchmark's statistics: from the evaluated runs (char_lm_report.evaluate_run's results) to
one row per objective, its difference from MDLM, the verdict on each of the paper's claims and the markdown tables
of docs/results.md. Pure functions of those results: nothing here reads a run directory or a checkpoint, so the
rules can be tested on synthetic numbers.

The rule behind every verdict: a difference counts when it exceeds two standard errors, and a mean over seeds has
the larger of the seed spread's and the measurements' own standard error (`seed_mean_stderr`).
"""

from __future__ import annotations

import math

import numpy as np


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target` (linear between evaluations); None if it never does."""
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            return t0 + (t1 - t0) * (v0 - target) / (v0 - v1) if v0 > target else t0
    return None


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
    return against_mdlm(table)


def compare(row: dict, reference: dict) -> tuple[dict, dict[str, dict]]:
    """(held-out, {NFE: generation}) differences of two rows of `summarise`'s table (`difference`: row minus
    reference, its standard error, the reading), generation at the NFEs both rows have."""
    held_out = difference(row["mean"], row["stderr_of_mean"], reference["mean"], reference["stderr_of_mean"])
    generation = {n: difference(value, row["generation_bits_stderr"][n], reference["generation_bits_per_byte"][n],
                                reference["generation_bits_stderr"][n])
                  for n, value in row.get("generation_bits_per_byte", {}).items()
                  if n in reference.get("generation_bits_per_byte", {})}
    return held_out, generation


def against_mdlm(table: dict) -> dict:
    """Each row of `summarise`'s table gets its difference from MDLM's row (`compare`), held-out as "minus_mdlm"
    and generated text per NFE as "generation_minus_mdlm"; the verdicts and the tables read these, so each
    difference is computed once. A table without MDLM is returned as it is."""
    mdlm = table.get("mdlm")
    if mdlm is None:
        return table
    for row in table.values():
        row["minus_mdlm"], row["generation_minus_mdlm"] = compare(row, mdlm)
    return table
    for row in table.values():
        row["minus_mdlm"] = difference(row["mean"], row["stderr_of_mean"], mdlm["mean"], mdlm["stderr_of_mean"])
        row["generation_minus_mdlm"] = {
            n: difference(value, row["generation_bits_stderr"][n], mdlm["generation_bits_per_byte"][n],
                          mdlm["generation_bits_stderr"][n])
            for n, value in row.get("generation_bits_per_byte", {}).items() if n in mdlm.get("generation_bits_per_byte", {})}
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


def _one_seed_note(a: dict, b: dict) -> str:
    return " (one seed on a side: the seed variance is unknown)" if 1 in (len(a["seeds"]), len(b["seeds"])) else ""


def verdicts(summary: dict, runs: list[dict], learned: str = "lomdm_paper") -> dict[str, dict]:
    """The paper's claims for `learned` against MDLM (`summary`: summarise's table, its differences from MDLM
    included), each read off the numbers by a rule fixed before the runs (a difference counts when it exceeds two
    standard errors, each side's from seed_mean_stderr):
      perplexity       held-out bits/byte (unbiased order form): confirmed if lower than MDLM's, not if higher or
                       level;
      learning speed   the fraction of MDLM's bytes at which each seed's unbiased held-out curve first reaches
                       MDLM's final value: confirmed if every seed gets there before MDLM does (< 1), not if any
                       seed never gets there within the budget;
      generation       AR-scored bits/byte of generated text at each NFE: confirmed at an NFE if lower than MDLM's;
      learned order    the paper's Figure 4: the backward velocity's rank correlation with the denoiser's confidence
                       is positive in every seed;
      zero-shot        not measurable here (the paper's 7 zero-shot sets are word-level benchmarks of a GPT-2-sized
                       model; a 3 M-parameter byte model has no meaningful score on them).
    With the ablation `<learned>_fixed` (c2 = 0: the same recipe, no learned order) in the table, held-out and
    generation are also read against it, by the same rule: what the learned order itself adds."""
    if learned not in summary or "mdlm" not in summary:
        return {}
    row, mdlm = summary[learned], summary["mdlm"]
    one_seed = _one_seed_note(row, mdlm)
    out = {}
    d = row["minus_mdlm"]
    out["perplexity"] = {**d, "verdict": _lower_is_confirmed(d["reading"]) + one_seed}
    fractions = row.get("fraction_of_mdlm_tokens_to_reach_its_final_order_form",
                        row.get("fraction_of_mdlm_tokens_to_reach_its_final"))
    if fractions:
        reached = [f for f in fractions if f is not None]
        out["learning speed"] = {"fractions": fractions, "verdict": (
            "confirmed at this scale" if len(reached) == len(fractions) and max(reached) < 1 else
            f"not confirmed: {len(fractions) - len(reached)} of {len(fractions)} seeds never reach MDLM's final value"
            if len(reached) < len(fractions) else "not confirmed: no faster than MDLM")}
    for n, d in row.get("generation_minus_mdlm", {}).items():
        out[f"generation NFE {n}"] = {**d, "verdict": _lower_is_confirmed(d["reading"])}
    rho = [(r.get("confidence") or {}).get("spearman_velocity_vs_confidence") for r in runs
           if r["objective"] == learned]
    if rho and all(v is not None for v in rho):
        out["learned order (Figure 4)"] = {"spearman_velocity_vs_confidence": rho, "verdict": (
            "confirmed at this scale" if min(rho) > 0 else "not confirmed: not positive in every seed")}
    out["zero-shot"] = {"verdict": "not measurable here"}
    ablation = summary.get(f"{learned}_fixed")
    if ablation is not None:
        one_seed = _one_seed_note(row, ablation)
        held_out, generation = compare(row, ablation)
        name = f"learned order against {learned}_fixed (c2 = 0)"
        out[f"{name}: held-out"] = {**held_out, "verdict": _lower_is_confirmed(held_out["reading"]) + one_seed}
        for n, d in generation.items():
            out[f"{name}: generation NFE {n}"] = {**d, "verdict": _lower_is_confirmed(d["reading"]) + one_seed}
    return out


def _numbers(values, fmt: str = "{:.3f}") -> str:
    return " / ".join("-" if v is None else fmt.format(v) for v in values)


def markdown_tables(result: dict) -> str:
    """The report as the markdown tables docs/results.md holds: the comparison per objective, then the learned order
    per run. Every number is read from `result` (report.json), none is recomputed."""
    summary = result["summary"]
    nfe = sorted({n for row in summary.values() for n in row.get("generation_bits_per_byte", {})}, key=int)
    lines = ["| objective | seeds | held-out bits/byte (mean +- seed std) | stderr | own estimator | minus MDLM (+- se) "
             "| MDLM's final reached at (fraction of its bytes) | " + " | ".join(f"generation NFE {n} (AR's bits/byte +- se)" for n in nfe)
             + " |", "|---|---|---|---|---|---|---|" + "---|" * len(nfe)]
    for objective, row in summary.items():
        spread = "" if row["std"] is None else f" +- {row['std']:.3f}"
        reach = _numbers(row.get("fraction_of_mdlm_tokens_to_reach_its_final", []), "{:.2f}")
        if "fraction_of_mdlm_tokens_to_reach_its_final_order_form" in row:
            reach += " (order form: " + _numbers(row["fraction_of_mdlm_tokens_to_reach_its_final_order_form"],
                                                 "{:.2f}") + ")"
        own = _numbers(row["own_estimator_bits_per_byte"]) if row["estimator"] != "own" else "same"
        minus = "-" if "minus_mdlm" not in row else f"{row['minus_mdlm']['difference']:+.3f} +- {row['minus_mdlm']['stderr']:.3f}"
        generation = [f"{row['generation_bits_per_byte'][n]:.3f} +- {row['generation_bits_stderr'][n]:.3f}"
                      if n in row.get("generation_bits_per_byte", {}) else "-" for n in nfe]
        lines.append(f"| {objective}{'' if row['complete'] else ' (incomplete)'} | {len(row['seeds'])} "
                     f"| {row['mean']:.3f}{spread} ({row['estimator']}) | {row['stderr']:.3f} | {own} | {minus} "
                     f"| {reach or '-'} | " + " | ".join(generation) + " |")
    if "fraction_of_mdlm_tokens_to_reach_its_final" in summary.get("mdlm", {}):
        lines += ["", "MDLM's own row in \"MDLM's final reached at\" is the measure's null: its seeds against their "
                      "own mean, so a seed slower than the mean never reaches it by construction."]
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
