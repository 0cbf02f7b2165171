"""fit.json as the tables a reader wants first (fit.md): per objective the parametric law and its allocation
exponents with their bootstrap intervals, the IsoFLOP minima and their power laws in C, then each compute
multiplier and its trend with compute, each compute marked inside its objective's run budgets or extrapolated.

It reads the JSON-able report (fit.json as written, "inf" for an infinite interval end), so a saved fit.json can be
rendered again without refitting: `summary_markdown(json.loads(Path("fit.json").read_text()))`; given the points
too (points.json), it opens each objective with its runs' losses by budget and size, the IsoFLOP profiles.
"""

from __future__ import annotations

import math
from typing import Sequence

from mdm_scale.scaling.isoflop import BUDGET_TOLERANCE, group_budgets
from mdm_scale.scaling.points import Point, by_objective


def _num(value, digits: int = 3) -> str:
    if isinstance(value, str):  # "inf" / "-inf" / "nan" as to_json writes them
        return value
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _interval(low, high, digits: int = 3) -> str:
    return f"[{_num(low, digits)}, {_num(high, digits)}]"


def _placed(compute, budgets) -> str:
    """C with where it lies against an objective's run budgets (each spans +-5 %, BUDGET_TOLERANCE): inside, or
    its law extrapolated by so many decades of C below or above them."""
    if compute is None or isinstance(compute, str) or not budgets:
        return _num(compute)
    low, high = min(budgets) / (1 + BUDGET_TOLERANCE), max(budgets) * (1 + BUDGET_TOLERANCE)
    if compute < low:
        return f"{_num(compute)} ({math.log10(min(budgets) / compute):.1f} dec below its runs)"
    if compute > high:
        return f"{_num(compute)} ({math.log10(compute / max(budgets)):.1f} dec above its runs)"
    return f"{_num(compute)} (inside)"


def _profiles(points: Sequence[Point]) -> list[str]:
    """Held-out loss by budget (rows, grouped as the IsoFLOP fit groups them) and N (columns); - : no run."""
    sizes = sorted({p.params for p in points})
    lines = ["Held-out loss (nats/token) by budget and non-embedding N:", "",
             "| C \\ N | " + " | ".join(_num(n) for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for flops, runs in group_budgets(points):
        loss = {p.params: p.loss for p in runs}
        lines.append(f"| {_num(flops)} | " + " | ".join(_num(loss.get(n), 4) for n in sizes) + " |")
    return lines + [""]


def _objective_tables(name: str, entry: dict, points: Sequence[Point] = ()) -> list[str]:
    lines = [f"### {name} ({entry['runs']} runs)", ""]
    if entry.get("budgets"):
        lines += [f"Budgets run: {', '.join(_num(c) for c in entry['budgets'])}; best run's loss "
                  f"{_num(entry['best_loss'], 4)}.", ""]
    if points:
        lines += _profiles(points)
    fit, boot = entry.get("parametric", {}), entry.get("bootstrap", {})
    if "unavailable" in fit:
        lines += [f"Parametric law: unavailable ({fit['unavailable']})", ""]
    else:
        intervals = boot.get("intervals", {}) if "unavailable" not in boot else {}
        header = "L(N, D) = E + A / N^alpha + B / D^beta (Huber fit"
        if intervals:
            header += f"; {boot['percentiles'][0]}-{boot['percentiles'][1]} % bootstrap intervals over runs, " \
                      f"{boot['samples'] - boot['failed']} of {boot['samples']} resamples converged)"
        else:
            header += f"; no bootstrap: {boot.get('unavailable', 'not run')})"
        lines += [header + ":", "", "| | estimate | interval |", "|---|---|---|"]
        values = dict(fit)
        values.update(boot.get("allocation_exponents", {}))
        labels = {"E": "E", "A": "A", "B": "B", "alpha": "alpha", "beta": "beta",
                  "n_opt_exponent": "a: N_opt ~ C^a", "d_opt_exponent": "b: D_opt ~ C^b"}
        for key, label in labels.items():
            if key in values:
                low_high = _interval(*intervals[key]) if key in intervals else "-"
                lines.append(f"| {label} | {_num(values[key])} | {low_high} |")
        lines.append("")
    minima = entry.get("isoflop_minima", [])
    if minima:
        lines += ["IsoFLOP minima (parabola in log N through each budget's runs):", "",
                  "| C | runs | N_opt | D_opt | L_opt | |", "|---|---|---|---|---|---|"]
        for m in minima:
            if m["usable"]:
                lines.append(f"| {_num(m['flops'])} | {m['num_runs']} | {_num(m['n_opt'])} | {_num(m['d_opt'])} | "
                             f"{_num(m['l_opt'], 4)} | |")
            else:
                lines.append(f"| {_num(m['flops'])} | {m['num_runs']} | - | - | - | {m['reason']} |")
        lines.append("")
    scaling = entry.get("isoflop_scaling", {})
    if "unavailable" in scaling:
        lines += [f"IsoFLOP power laws: unavailable ({scaling['unavailable']})", ""]
    elif scaling:
        boot = entry.get("isoflop_bootstrap", {})
        intervals = boot.get("intervals", {})
        laws = ", ".join(f"{k} ~ C^{_num(scaling[k]['exponent'])}" + (f" {_interval(*intervals[k])}" if k in intervals
                                                                       else "") for k in ("n_opt", "d_opt", "l_opt"))
        how = (f"{boot['percentiles'][0]}-{boot['percentiles'][1]} % intervals from {boot['samples'] - boot['failed']} "
               f"of {boot['samples']} resamples of each budget's runs" if intervals
               else f"no intervals: {boot.get('unavailable', 'not run')}")
        lines += [f"IsoFLOP power laws over {len(scaling['budgets'])} budgets ({how}): {laws}", ""]
    return lines


def summary_markdown(report: dict, points: Sequence[Point] = ()) -> str:
    lines = [f"# Scaling fit: {report['runs']} runs", ""]
    groups = by_objective(points)
    for name, entry in report["objectives"].items():
        lines += _objective_tables(name, entry, groups.get(name, ()))
    budgets = {name: entry.get("budgets", []) for name, entry in report["objectives"].items()}
    if report.get("multipliers"):
        lines += ["### Compute multipliers at equal loss (C_b / C_a on the compute-optimal frontiers)", "",
                  "C_a, C_b: each full fit's compute at that loss, and where it lies against its objective's run "
                  "budgets.", "",
                  "| b / a | loss | multiplier | interval | C_a | C_b | resamples: failed / one unreachable / none / "
                  "errors |", "|---|---|---|---|---|---|---|"]
        for key, m in report["multipliers"].items():
            b, a = key.split("/")
            if "unavailable" in m:
                lines.append(f"| {key} | {_num(m['loss'], 4)} | - | - | - | - | unavailable: {m['unavailable']} |")
            else:
                lines.append(f"| {key} | {_num(m['loss'], 4)} | {_num(m['estimate'])} | "
                             f"{_interval(m['low'], m['high'])} | {_placed(m.get('compute_a'), budgets.get(a))} | "
                             f"{_placed(m.get('compute_b'), budgets.get(b))} | {m['failed']} / {m['unreachable']} / "
                             f"{m['both_unreachable']} / {m['errors']} of {m['samples']} |")
        lines.append("")
    for key, trend in report.get("multiplier_trends", {}).items():
        if "unavailable" in trend:
            lines += [f"### {key} across budgets: unavailable ({trend['unavailable']})", ""]
            continue
        g, g_low, g_high = trend["growth_per_decade"]
        b = key.split("/")[0]
        lines += [f"### {key} across budgets (at the reference's compute-optimal loss at each budget)", "",
                  "| C | loss | multiplier | interval | C_b |", "|---|---|---|---|---|"]
        for c, loss, m in zip(trend["budgets"], trend["losses"], trend["intervals"]):
            lines.append(f"| {_num(c)} | {_num(loss, 4)} | {_num(m['estimate'])} | {_interval(m['low'], m['high'])} | "
                         f"{_placed(m.get('compute_b'), budgets.get(b))} |")
        lines += ["", f"Growth per decade of C: g = {_num(g)} {_interval(g_low, g_high)} ({trend['growth_samples']} "
                      f"resamples with a multiplier at both ends; g > 1: the multiplier grows with C)", ""]
    return "\n".join(lines)
