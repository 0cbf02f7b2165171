"""Chinchilla's approach 2 (Hoffmann et al. 2022): IsoFLOP profiles, read without assuming a functional form for L.

Runs of one objective whose FLOPs agree within 5 % form a budget C; in x = log10 N the loss is fitted by a parabola

    L(x) ~ p2 x^2 + p1 x + p0,   x* = -p1 / (2 p2),   N_opt = 10^x*,   L_opt = L(x*),

and D_opt comes from the budget's own runs: log D interpolated linearly in log N at x*. Across budgets,
y = k C^a is fitted by least squares in log10 space for y = N_opt, D_opt and L_opt (the last a pure power law
with no irreducible term: a local description over the budgets fitted, not an extrapolation). Intervals on the
three exponents (`isoflop_scaling_bootstrap`) come from resampling each budget's runs with replacement and
redoing both steps; a resample that leaves fewer than 2 usable budgets gives no exponent and is counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mdm_scale.scaling.points import Point, by_objective

BUDGET_TOLERANCE = 0.05


@dataclass
class IsoflopMinimum:
    """The parabola minimum of one budget, or why that budget gives none (`usable` False, `reason` set, and
    n_opt, d_opt, l_opt None: an unusable budget never yields an optimum). `coefficients` is the fitted parabola
    whenever there were 3 sizes or more, also when it is unusable for non-positive curvature or a minimum outside
    the sizes run (plots draw it); it is None only with fewer than 3 sizes."""

    objective: str
    flops: float
    num_runs: int
    num_sizes: int
    params_range: tuple[float, float]
    usable: bool
    reason: str = ""
    coefficients: tuple[float, float, float] | None = None  # p2, p1, p0 of L in log10 N
    n_opt: float | None = None
    d_opt: float | None = None
    l_opt: float | None = None


def group_budgets(points: Sequence[Point], budgets: Sequence[float] | None = None,
                  tolerance: float = BUDGET_TOLERANCE) -> list[tuple[float, list[Point]]]:
    """[(C, its points)] by increasing C: runs planned at one budget land a little off it (rounded steps/batches).

    Without `budgets`: points are sorted by FLOPs; a budget starts at the smallest remaining FLOPs c0 and takes
    every point with FLOPs <= (1 + tolerance) c0, so a budget spans at most 5 % and a chain of points 4 % apart
    is split rather than merged. C is the geometric mean of its points' FLOPs.
    With `budgets`: each point joins the budget within `tolerance` (relative) of its FLOPs, and C is that
    budget; a point near none raises ValueError (a point is never dropped silently). Objectives are not looked at:
    call per objective.
    """
    if budgets is not None:
        groups: dict[float, list[Point]] = {float(c): [] for c in budgets}
        for p in points:
            near = [c for c in groups if abs(p.flops / c - 1) <= tolerance]
            if not near:
                raise ValueError(f"run {p.run_dir or p.params} with {p.flops:.4g} FLOPs is within {tolerance:.0%} "
                                 f"of no budget in {sorted(groups)}")
            groups[min(near, key=lambda c: abs(math.log(p.flops / c)))].append(p)
        return [(c, groups[c]) for c in sorted(groups) if groups[c]]
    ordered, out = sorted(points, key=lambda p: p.flops), []
    while ordered:
        c0 = ordered[0].flops
        group = [p for p in ordered if p.flops <= (1 + tolerance) * c0]
        ordered = ordered[len(group):]
        out.append((float(np.exp(np.mean([math.log(p.flops) for p in group]))), group))
    return out


def _interp_extrapolating(x: float, xp: np.ndarray, fp: np.ndarray) -> float:
    """Piecewise-linear interpolation that continues the end segments (np.interp would clamp)."""
    if len(xp) == 1:
        return float(fp[0])
    i = int(np.clip(np.searchsorted(xp, x) - 1, 0, len(xp) - 2))
    return float(fp[i] + (fp[i + 1] - fp[i]) * (x - xp[i]) / (xp[i + 1] - xp[i]))


def isoflop_minimum(objective: str, flops: float, points: Sequence[Point], *, extrapolate: bool = False
                    ) -> IsoflopMinimum:
    """One budget's parabola minimum; unusable with fewer than 3 sizes, non-positive curvature (no minimum), or,
    unless `extrapolate`, a minimum outside the sizes run (the parabola is then a guess past the data)."""
    log_n = np.log10([p.params for p in points])
    sizes = np.unique(log_n)
    base = IsoflopMinimum(objective, float(flops), len(points), len(sizes),
                          (float(10 ** sizes[0]), float(10 ** sizes[-1])), usable=False)
    if len(sizes) < 3:
        return dataclasses.replace(base, reason=f"{len(sizes)} model size(s); a parabola needs at least 3")
    p2, p1, p0 = (float(c) for c in np.polyfit(log_n, [p.loss for p in points], 2))
    base = dataclasses.replace(base, coefficients=(p2, p1, p0))
    if p2 <= 0:
        return dataclasses.replace(base, reason=f"curvature {p2:.3g} <= 0: loss has no minimum in log N here")
    x_opt = -p1 / (2 * p2)
    if not extrapolate and not sizes[0] <= x_opt <= sizes[-1]:
        return dataclasses.replace(base, reason=f"minimum at N={10 ** x_opt:.3g} outside the sizes run "
                                                f"[{10 ** sizes[0]:.3g}, {10 ** sizes[-1]:.3g}]; extend the grid")
    log_d = np.array([np.mean([math.log10(p.tokens) for p, x in zip(points, log_n) if x == s]) for s in sizes])
    return dataclasses.replace(base, usable=True, n_opt=float(10 ** x_opt),
                               d_opt=float(10 ** _interp_extrapolating(x_opt, sizes, log_d)),
                               l_opt=float(p0 - p1 ** 2 / (4 * p2)))


def isoflop_minima(points: Sequence[Point], budgets: Sequence[float] | None = None, *,
                   tolerance: float = BUDGET_TOLERANCE, extrapolate: bool = False) -> list[IsoflopMinimum]:
    """Every (objective, budget)'s IsoFLOP minimum, usable or not, sorted by objective then FLOPs
    (grouping: `group_budgets`)."""
    return [isoflop_minimum(objective, c, group, extrapolate=extrapolate)
            for objective, runs in by_objective(points).items()
            for c, group in group_budgets(runs, budgets, tolerance)]


def percentile_interval(values: Sequence[float], percentiles: tuple[float, float]) -> tuple[float, float]:
    """A bootstrap interval as order statistics (np.percentile lower / higher): an infinite end stays infinite
    rather than being interpolated."""
    return (float(np.percentile(values, percentiles[0], method="lower")),
            float(np.percentile(values, percentiles[1], method="higher")))


@dataclass
class PowerLaw:
    """y = coefficient * C^exponent, fitted by least squares in log10 space."""

    coefficient: float
    exponent: float
    num_points: int

    def predict(self, flops):
        return self.coefficient * np.asarray(flops, dtype=float) ** self.exponent


def power_law_fit(flops: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least-squares line in (log10 C, log10 y): the form in which the Chinchilla exponents are read."""
    flops, y = np.asarray(flops, dtype=float), np.asarray(y, dtype=float)
    if len(flops) < 2 or len(np.unique(flops)) < 2:
        raise ValueError(f"a power law needs at least 2 distinct budgets, got {len(np.unique(flops))}")
    if np.any(flops <= 0) or np.any(y <= 0):
        raise ValueError("a power law is fitted in log space: every C and y must be positive")
    slope, intercept = np.polyfit(np.log10(flops), np.log10(y), 1)
    return PowerLaw(float(10 ** intercept), float(slope), len(flops))


@dataclass
class IsoflopScaling:
    """Approach 2's laws for one objective: N_opt, D_opt and L_opt against C over its usable budgets."""

    objective: str
    budgets: list[float]
    n_opt: PowerLaw
    d_opt: PowerLaw
    l_opt: PowerLaw  # pure power law in C (no irreducible term): valid over the budgets fitted only


def isoflop_scaling(minima: Sequence[IsoflopMinimum]) -> IsoflopScaling:
    """Power laws through the usable minima of one objective; ValueError with every budget's reason when fewer
    than 2 are usable."""
    objectives = {m.objective for m in minima}
    if len(objectives) != 1:
        raise ValueError(f"isoflop_scaling takes one objective's minima, got {sorted(objectives)}")
    usable = [m for m in minima if m.usable]
    if len(usable) < 2:
        reasons = "; ".join(f"C={m.flops:.3g}: {m.reason}" for m in minima if not m.usable)
        raise ValueError(f"{objectives.pop()}: {len(usable)} usable budget(s), need 2 ({reasons})")
    c = [m.flops for m in usable]
    return IsoflopScaling(usable[0].objective, c, power_law_fit(c, [m.n_opt for m in usable]),
                          power_law_fit(c, [m.d_opt for m in usable]), power_law_fit(c, [m.l_opt for m in usable]))


@dataclass
class IsoflopScalingIntervals:
    """Bootstrap intervals of the IsoFLOP exponents: (low, high) per law ("n_opt", "d_opt", "l_opt") from the
    `samples - failed` resamples that kept at least 2 usable budgets."""

    samples: int
    failed: int
    percentiles: tuple[float, float]
    intervals: dict[str, tuple[float, float]]


def isoflop_scaling_bootstrap(points: Sequence[Point], *, samples: int = 200, seed: int = 0,
                              percentiles: tuple[float, float] = (2.5, 97.5),
                              tolerance: float = BUDGET_TOLERANCE) -> IsoflopScalingIntervals:
    """One objective's IsoFLOP exponents under resampling: each resample redraws every budget's runs with
    replacement (the budgets stay those run), refits the parabolas and the power laws. ValueError if no resample
    kept 2 usable budgets."""
    groups = group_budgets(points, tolerance=tolerance)
    rng = np.random.default_rng(seed)
    exponents: dict[str, list[float]] = {"n_opt": [], "d_opt": [], "l_opt": []}
    failed = 0
    for _ in range(samples):
        minima = [isoflop_minimum(runs[0].objective, c, [runs[i] for i in rng.integers(0, len(runs), len(runs))])
                  for c, runs in groups]
        try:
            scaling = isoflop_scaling(minima)
        except ValueError:
            failed += 1
            continue
        for key in exponents:
            exponents[key].append(getattr(scaling, key).exponent)
    if failed == samples:
        raise ValueError(f"no resample of {samples} kept 2 usable budgets")
    return IsoflopScalingIntervals(samples, failed, percentiles,
                                   {key: percentile_interval(v, percentiles) for key, v in exponents.items()})
