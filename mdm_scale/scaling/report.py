"""One fit report over finished runs: per objective the IsoFLOP minima and laws, the parametric law with bootstrap
intervals, and each objective's compute multiplier against a reference objective (isoflop.py, parametric.py and
frontier.py do the mathematics; plots.py draws fit.png).

The multiplier is asked at the best loss the reference objective's own runs reached, so it is read inside the range
the runs cover, not extrapolated beyond it; its trend (`multiplier_trends`) at the loss the reference's frontier
reaches at each of the reference's budgets, with the growth per decade of C between the first and the last. The
other objective's C at those losses may still lie outside its own runs: each objective's "budgets" and "best_loss"
are kept beside its fits, and fit.md marks a C outside its objective's budgets as extrapolated, by how many
decades. A part that cannot be computed (too few runs, too few usable budgets, a loss an objective's fit cannot
reach, a frontier outside its searched range) is reported with its reason, never as a number: "plot_omitted" lists
what fit.png leaves out, and a plot that fails altogether is reported as "plot": "unavailable: ..." with fit.json
still written. Each objective's parametric fit on all its runs is computed once and shared by its bootstrap and the
multipliers. fit.json is strict JSON (`to_json`): a non-finite number, such as an unbounded multiplier interval, is
written as a string, not null.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from mdm_scale.scaling.frontier import compute_multiplier_interval, flops_per_token_from_points, multiplier_trend
from mdm_scale.scaling.isoflop import isoflop_minima, isoflop_scaling, isoflop_scaling_bootstrap
from mdm_scale.scaling.parametric import bootstrap_parametric, fit_parametric
from mdm_scale.scaling.plots import plot_fit
from mdm_scale.scaling.points import Point, by_objective, write_points
from mdm_scale.scaling.summary import summary_markdown

FULL_FIT_RESTARTS = 32  # L-BFGS-B starts of each objective's fit on all its runs


def fit_report(points: list[Point], *, samples: int = 200, seed: int = 0, reference: str = "mdlm",
               out: Path | None = None) -> dict:
    """The report as a JSON-able dict; with `out`, also <out>/fit.json, its tables <out>/fit.md, <out>/fit.png and
    <out>/points.json (the fit's input, which `fit --points` reads back)."""
    groups = by_objective(points)
    report: dict = {"runs": len(points), "objectives": {}, "multipliers": {}, "multiplier_trends": {}}
    fits, per_token = {}, {}
    for objective, runs in groups.items():
        minima = isoflop_minima(runs)
        entry: dict = {"runs": len(runs), "budgets": [m.flops for m in minima],
                       "best_loss": min(p.loss for p in runs), "isoflop_minima": minima}
        try:
            entry["isoflop_scaling"] = isoflop_scaling(entry["isoflop_minima"])
            entry["isoflop_bootstrap"] = isoflop_scaling_bootstrap(runs, samples=samples, seed=seed)
        except ValueError as e:
            entry.setdefault("isoflop_scaling", {"unavailable": str(e)})
            entry.setdefault("isoflop_bootstrap", {"unavailable": str(e)})
        try:
            fit = fit_parametric(runs, restarts=FULL_FIT_RESTARTS, seed=seed)
            f = flops_per_token_from_points(runs)  # f(N) as the runs counted it
        except (ValueError, RuntimeError) as e:  # RuntimeError: no L-BFGS-B start ended finite
            entry["parametric"] = {"unavailable": str(e)}
        else:
            fits[objective], per_token[objective], entry["parametric"] = fit, f, fit
            try:  # from this very fit: it is computed once per objective and shared with the multipliers
                entry["bootstrap"] = bootstrap_parametric(runs, samples=samples, seed=seed,
                                                          full_fit_restarts=FULL_FIT_RESTARTS, full_fit=fit)
            except (ValueError, RuntimeError) as e:  # RuntimeError: no resample's refit converged
                entry["bootstrap"] = {"unavailable": str(e)}
        report["objectives"][objective] = entry
    if reference in fits:
        loss = min(p.loss for p in groups[reference])
        for objective in fits:
            if objective == reference:
                continue
            try:
                report["multipliers"][f"{objective}/{reference}"] = compute_multiplier_interval(
                    groups[reference], groups[objective], loss, per_token[reference], per_token[objective],
                    samples=samples, seed=seed, full_fit_restarts=FULL_FIT_RESTARTS, fit_a=fits[reference],
                    fit_b=fits[objective])
            except (ValueError, RuntimeError) as e:  # RuntimeError: no resample gave a multiplier
                report["multipliers"][f"{objective}/{reference}"] = {"loss": loss, "unavailable": str(e)}
            budgets = report["objectives"][reference]["budgets"]
            try:
                report["multiplier_trends"][f"{objective}/{reference}"] = multiplier_trend(
                    groups[reference], groups[objective], budgets, per_token[reference], per_token[objective],
                    samples=samples, seed=seed, full_fit_restarts=FULL_FIT_RESTARTS, fit_a=fits[reference],
                    fit_b=fits[objective])
            except (ValueError, RuntimeError) as e:
                report["multiplier_trends"][f"{objective}/{reference}"] = {"budgets": budgets, "unavailable": str(e)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_points(points, out / "points.json")
        if fits:
            try:
                trends = {k: v for k, v in report["multiplier_trends"].items() if not isinstance(v, dict)}
                plot = plot_fit(points, fits, out / "fit.png", flops_per_token=per_token, trends=trends)
                report["plot"], report["plot_omitted"] = plot.path, plot.omitted
            except Exception as e:  # the figure is a view of the numbers: its failure must not cost fit.json
                report["plot"] = f"unavailable: {type(e).__name__}: {e}"
        else:
            report["plot"] = "unavailable: no objective has a parametric fit"
    result = json.loads(to_json(report))
    if out is not None:
        (out / "fit.json").write_text(json.dumps(result, indent=1))
        (out / "fit.md").write_text(summary_markdown(result, points))
    return result


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def to_json(result, **kwargs) -> str:
    """Strict JSON of any scaling result (dataclasses, lists and dicts of them). JSON has no inf or nan, so a
    non-finite number is written as the string "inf", "-inf" or "nan" rather than silently as null."""
    return json.dumps(_jsonable(result), allow_nan=False, **kwargs)
