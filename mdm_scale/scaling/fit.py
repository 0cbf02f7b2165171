"""Compute-optimal scaling laws from finished runs (Hoffmann et al. 2022, "Chinchilla", approaches 2 and 3).

Each run is a `Point`: N non-embedding parameters, D training tokens, C training FLOPs and its held-out NELBO L in
nats/token. Nothing here assumes C = 6 N D: the compute frontier takes a FLOPs-per-token function f(N), so that
D = C / f(N) (the points' own C / D gives f when none is supplied, `flops_per_token_from_points`).

Approach 2, IsoFLOP profiles (`isoflop_minima`, `isoflop_scaling`). Runs of one objective whose FLOPs agree within
5 % form a budget C; in x = log10 N the loss is fitted by a parabola

    L(x) ~ p2 x^2 + p1 x + p0,   x* = -p1 / (2 p2),   N_opt = 10^x*,   L_opt = L(x*),

and D_opt comes from the budget's own runs: log D interpolated linearly in log N at x*. Across budgets,
y = k C^a is fitted by least squares in log10 space for y = N_opt, D_opt and L_opt (the last a pure power law
with no irreducible term: a local description over the budgets fitted, not an extrapolation).

Approach 3, parametric fit (`fit_parametric`):

    L(N, D) = E + A / N^alpha + B / D^beta,

with a = log A, b = log B, e = log E, minimising over (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3,

by L-BFGS-B from many initial points; `bootstrap_parametric` resamples runs for percentile intervals.

Compute-optimal frontier (`compute_optimal`): L_opt(C) = min_N L(N, C / f(N)), minimised numerically over log N.
Compute multiplier (`compute_multiplier`): C_b(L) / C_a(L), where C_x(L) solves L_opt_x(C) = L; it exists only for
L > E_x.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import brentq, minimize, minimize_scalar

from mdm_scale.plots import pyplot, save_figure

FlopsPerToken = Callable[[float], float]
PARAMETERS = ("E", "A", "B", "alpha", "beta")
BUDGET_TOLERANCE = 0.05


@dataclass
class Point:
    """One finished run. params: non-embedding N; tokens: D; flops: C; loss: held-out NELBO (nats/token)."""

    objective: str
    params: float
    tokens: float
    flops: float
    loss: float
    run_dir: str = ""

    def __post_init__(self):
        for name in ("params", "tokens", "flops", "loss"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):  # every fit works in log space
                raise ValueError(f"Point {self.run_dir or self.objective}: {name}={value} must be positive and finite")
            setattr(self, name, value)


def by_objective(points: Sequence[Point]) -> dict[str, list[Point]]:
    """{objective: its points}, objectives sorted: every law is fitted per objective, never across them."""
    groups: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        groups[p.objective].append(p)
    return {k: groups[k] for k in sorted(groups)}


# -------------------------------------------------------------------------------------- approach 2: IsoFLOP
@dataclass
class IsoflopMinimum:
    """The parabola minimum of one budget, or why that budget gives none (`usable` False, `reason` set, the
    optimum fields None: an unusable budget never yields a number)."""

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


# ----------------------------------------------------------------------------------- approach 3: parametric
@dataclass
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta. objective_value: the summed Huber loss in log space at the fit."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective_value: float = float("nan")
    num_points: int = 0
    converged: bool = True
    message: str = ""

    def predict(self, params, tokens):
        n, d = np.asarray(params, dtype=float), np.asarray(tokens, dtype=float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta


# Chinchilla's initialisation grid over (a, b, e, alpha, beta) and the box L-BFGS-B searches for e, alpha, beta
# (exponents >= 0: a term that grew with N or D would not be a scaling law).
_GRID = np.stack(np.meshgrid(np.arange(0, 26, 5.0), np.arange(0, 26, 5.0), np.arange(-1, 1.01, 0.5),
                             np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5), indexing="ij"), -1).reshape(-1, 5)
_BOUNDS = [(-10.0, 5.0), (0.0, 4.0), (0.0, 4.0)]  # e, alpha, beta


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))


def _huber_objective(theta: np.ndarray, log_n, log_d, log_l, delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log-space residuals LSE(a - alpha log N, b - beta log D, e) - log L and its
    gradient in theta = (a, b, e, alpha, beta), vectorised over runs (L-BFGS-B calls it thousands of times)."""
    a, b, e, alpha, beta = theta
    u_n, u_d = a - alpha * log_n, b - beta * log_d  # [n]
    top = np.maximum(np.maximum(u_n, u_d), e)
    s_n, s_d, s_e = np.exp(u_n - top), np.exp(u_d - top), np.exp(e - top)
    total = s_n + s_d + s_e
    r = top + np.log(total) - log_l  # [n]
    g = np.clip(r, -delta, delta) / total  # [n] Huber'(r) / sum: times s_k gives d/du_k
    g_n, g_d = g * s_n, g * s_d
    grad = np.array([g_n.sum(), g_d.sum(), (g * s_e).sum(), -(g_n * log_n).sum(), -(g_d * log_d).sum()])
    return float(_huber(r, delta).sum()), grad


def _huber_objective_many(thetas: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    """[k] summed Huber loss at each of thetas [k, 5]: ranks the initial points in one vectorised pass."""
    a, b, e, alpha, beta = (thetas[:, i, None] for i in range(5))  # [k, 1] each
    u = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e))  # [3, k, n]
    top = u.max(0)
    r = top + np.log(np.exp(u - top).sum(0)) - log_l  # [k, n]
    return _huber(r, delta).sum(1)


def _arrays(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.log([p.params for p in points]), np.log([p.tokens for p in points]),
            np.log([p.loss for p in points]))


def _single_threaded_openblas():
    """BLAS on one thread while L-BFGS-B runs. Since scipy 1.15 L-BFGS-B calls LAPACK on 5 x 5-sized problems, and
    a threaded OpenBLAS makes each call wait for its threads: 25 ms instead of 0.1 ms per step on a busy 2-core
    machine (scipy issues 22438, 23191; botorch limits threads the same way)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def fit_parametric(points: Sequence[Point], *, restarts: int = 32, seed: int = 0, huber_delta: float = 1e-3,
                   starts: Sequence[Sequence[float]] = ()) -> ParametricFit:
    """Chinchilla's approach 3 on one objective's runs.

    The objective is not convex and the Huber loss is nearly L1, so one start is not enough: Chinchilla's grid
    plus as many uniform random draws over the same box (`seed`) are ranked by the objective in one vectorised
    pass and L-BFGS-B runs from the best `restarts` of them and from each extra `starts` row (a, b, e, alpha,
    beta); the lowest final objective wins. `converged` reports L-BFGS-B's own verdict for the winner.
    L-BFGS-B works on a - alpha mean(log N) and b - beta mean(log D) in place of a and b: the same law, but the
    intercepts no longer move with the exponents, which takes about 3 times fewer steps.
    """
    if len(by_objective(points)) != 1:
        raise ValueError(f"fit one objective at a time, got {sorted(by_objective(points))}")
    if len(points) < 5:
        raise ValueError(f"{len(points)} runs for 5 parameters: a parametric fit needs at least 5")
    log_n, log_d, log_l = _arrays(points)
    rng = np.random.default_rng(seed)
    low, high = _GRID.min(0), _GRID.max(0)
    candidates = np.concatenate([_GRID, low + (high - low) * rng.random((len(_GRID), 5))])
    ranked = candidates[np.argsort(_huber_objective_many(candidates, log_n, log_d, log_l, huber_delta))]
    initial = np.concatenate([ranked[:restarts], np.asarray(starts, dtype=float).reshape(-1, 5)])
    centre = np.array([log_n.mean(), log_d.mean()])
    shift = np.zeros((5, 5))  # theta_centred = theta + theta @ shift: a -= alpha mean(log N), b -= beta mean(log D)
    shift[3, 0], shift[4, 1] = -centre
    scale = 1.0 / (huber_delta * len(points))  # gradient of order 1 whatever delta and the number of runs

    def objective(theta_centred):
        value, grad = _huber_objective(theta_centred, log_n - centre[0], log_d - centre[1], log_l, huber_delta)
        return value * scale, grad * scale

    best = None
    with _single_threaded_openblas():
        for theta0 in initial:
            result = minimize(objective, theta0 + theta0 @ shift, jac=True, method="L-BFGS-B",
                              bounds=[(None, None), (None, None), *_BOUNDS],
                              options={"maxiter": 2000, "ftol": 1e-10, "gtol": 1e-8})
            if np.isfinite(result.fun) and (best is None or result.fun < best.fun):
                best = result
    if best is None:
        raise RuntimeError("every L-BFGS-B start ended in a non-finite objective")
    a, b, e, alpha, beta = (float(x) for x in best.x - best.x @ shift)
    return ParametricFit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, float(best.fun / scale), len(points),
                         bool(best.success), str(best.message))


def _theta(fit: ParametricFit) -> list[float]:
    return [math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta]


@dataclass
class BootstrapResult:
    """The fit on all runs and percentile intervals over refits on runs resampled with replacement. failed:
    resamples whose refit did not converge (left out of the intervals, counted here)."""

    fit: ParametricFit
    samples: int
    failed: int
    percentiles: tuple[float, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)


def _resample(points: Sequence[Point], rng: np.random.Generator) -> list[Point]:
    return [points[i] for i in rng.integers(0, len(points), len(points))]


def bootstrap_parametric(points: Sequence[Point], *, samples: int = 200, seed: int = 0, restarts: int = 4,
                         percentiles: tuple[float, float] = (2.5, 97.5), huber_delta: float = 1e-3
                         ) -> BootstrapResult:
    """How far the runs pin each parameter down: runs are resampled with replacement `samples` times and refitted
    (from the full fit's optimum plus the best `restarts` initial points of the resample)."""
    full = fit_parametric(points, restarts=max(restarts, 32), seed=seed, huber_delta=huber_delta)
    rng = np.random.default_rng(seed)
    draws, failed = [], 0
    for _ in range(samples):
        refit = fit_parametric(_resample(points, rng), restarts=restarts, seed=int(rng.integers(2 ** 31)),
                               huber_delta=huber_delta, starts=[_theta(full)])
        if refit.converged:
            draws.append([getattr(refit, k) for k in PARAMETERS])
        else:
            failed += 1
    if not draws:
        raise RuntimeError(f"all {samples} bootstrap refits failed to converge")
    bounds = np.percentile(np.array(draws), percentiles, axis=0)  # [2, 5]
    intervals = {k: (float(bounds[0, i]), float(bounds[1, i])) for i, k in enumerate(PARAMETERS)}
    return BootstrapResult(full, samples, failed, tuple(percentiles), intervals)


# ------------------------------------------------------------------------------- compute-optimal frontier
def flops_per_token_from_points(points: Sequence[Point]) -> FlopsPerToken:
    """f(N) as the runs themselves counted it: a power law fitted to C / D against N (exactly 6 N when the runs
    used 6 N D; close to the runs' own count otherwise). For plots and defaults; pass the model's f when known."""
    law = power_law_fit([p.params for p in points], [p.flops / p.tokens for p in points])
    return lambda n: float(law.predict(n))


def compute_optimal(fit: ParametricFit, flops: float, flops_per_token: FlopsPerToken, *, grid: int = 400
                    ) -> tuple[float, float, float]:
    """(N_opt, D_opt, L_opt) at C = `flops`: L(N, C / f(N)) minimised over log N (grid over 1 <= N <= C, then
    bounded Brent in the best cell), so any f works, not only 6 N. ValueError if the minimum is at an end."""
    x = np.linspace(0.0, math.log(flops), grid)
    n = np.exp(x)
    values = fit.predict(n, flops / np.array([flops_per_token(float(v)) for v in n]))  # f need not be vectorised

    def loss(log_n: float) -> float:
        return float(fit.predict(math.exp(log_n), flops / flops_per_token(math.exp(log_n))))

    i = int(np.argmin(values))
    if i in (0, grid - 1):
        raise ValueError(f"compute-optimal N at C={flops:.3g} lies at the end of the searched range "
                         f"[1, {flops:.3g}]: check flops_per_token")
    best = minimize_scalar(loss, bounds=(x[i - 1], x[i + 1]), method="bounded", options={"xatol": 1e-10})
    n = math.exp(best.x)
    return n, flops / flops_per_token(n), float(best.fun)


def compute_for_loss(fit: ParametricFit, loss: float, flops_per_token: FlopsPerToken, *,
                     flops_range: tuple[float, float] = (1e6, 1e40)) -> float:
    """The FLOPs at which the compute-optimal frontier reaches `loss` (brentq in log C); ValueError if the loss is
    at or below E (no compute reaches it) or outside the frontier over `flops_range`."""
    if loss <= fit.E:
        raise ValueError(f"loss {loss:.6g} is at or below the fit's irreducible loss E={fit.E:.6g}: "
                         f"no amount of compute reaches it")

    def gap(log_c: float) -> float:
        return compute_optimal(fit, math.exp(log_c), flops_per_token)[2] - loss

    low, high = (math.log(c) for c in flops_range)
    if gap(low) < 0 or gap(high) > 0:
        raise ValueError(f"loss {loss:.6g} is reached outside C in [{flops_range[0]:.3g}, {flops_range[1]:.3g}] "
                         f"(frontier from {gap(low) + loss:.6g} to {gap(high) + loss:.6g})")
    return math.exp(brentq(gap, low, high, xtol=1e-12, rtol=1e-12))


def compute_multiplier(fit_a: ParametricFit, fit_b: ParametricFit, loss: float, flops_per_token_a: FlopsPerToken,
                       flops_per_token_b: FlopsPerToken | None = None) -> float:
    """C_b(L) / C_a(L): how many times a's compute b needs to reach `loss` when both train compute-optimally
    (> 1: b is less compute-efficient). f_b defaults to f_a."""
    c_a = compute_for_loss(fit_a, loss, flops_per_token_a)
    return compute_for_loss(fit_b, loss, flops_per_token_b or flops_per_token_a) / c_a


@dataclass
class MultiplierInterval:
    """compute_multiplier on all runs and its bootstrap interval; unpacks as (estimate, low, high). A resample
    where one fit cannot reach the loss counts as ratio 0 (a unreachable) or inf (b unreachable) in the interval
    and in `unreachable`; failed: resamples left out because a refit did not converge or neither fit reaches the
    loss."""

    loss: float
    estimate: float
    low: float
    high: float
    samples: int
    failed: int
    unreachable: int

    def __iter__(self):
        return iter((self.estimate, self.low, self.high))


def compute_multiplier_interval(points_a: Sequence[Point], points_b: Sequence[Point], loss: float,
                                flops_per_token_a: FlopsPerToken, flops_per_token_b: FlopsPerToken | None = None, *,
                                samples: int = 200, seed: int = 0, restarts: int = 4,
                                percentiles: tuple[float, float] = (2.5, 97.5)) -> MultiplierInterval:
    """The multiplier's uncertainty from both objectives' runs at once: each resample redraws a's runs and b's
    runs (each with replacement), refits both and takes the ratio. Interval ends are order statistics
    (np.percentile lower / higher), so infinite ratios stay infinite rather than being interpolated."""
    f_b = flops_per_token_b or flops_per_token_a
    fit_a, fit_b = (fit_parametric(p, restarts=max(restarts, 32), seed=seed) for p in (points_a, points_b))
    estimate = compute_multiplier(fit_a, fit_b, loss, flops_per_token_a, f_b)
    rng = np.random.default_rng(seed)
    ratios, failed, unreachable = [], 0, 0
    for _ in range(samples):
        refits = [fit_parametric(_resample(p, rng), restarts=restarts, seed=int(rng.integers(2 ** 31)),
                                 starts=[_theta(full)]) for p, full in ((points_a, fit_a), (points_b, fit_b))]
        if not all(r.converged for r in refits):
            failed += 1
            continue
        c = []
        for refit, f in zip(refits, (flops_per_token_a, f_b)):
            try:
                c.append(compute_for_loss(refit, loss, f))
            except ValueError:
                c.append(math.inf)
        if math.isinf(c[0]) and math.isinf(c[1]):
            failed += 1
            continue
        unreachable += any(math.isinf(x) for x in c)
        ratios.append(c[1] / c[0])
    if not ratios:
        raise RuntimeError(f"no bootstrap resample of {samples} gave a multiplier")
    low = float(np.percentile(ratios, percentiles[0], method="lower"))
    high = float(np.percentile(ratios, percentiles[1], method="higher"))
    return MultiplierInterval(float(loss), estimate, low, high, samples, failed, unreachable)


# ----------------------------------------------------------------------------------------------- output
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
    """Strict JSON of any result here (dataclasses, lists and dicts of them). JSON has no inf or nan, so a
    non-finite number is written as the string "inf", "-inf" or "nan" rather than silently as null."""
    return json.dumps(_jsonable(result), allow_nan=False, **kwargs)


def plot_fit(points: Sequence[Point], fits: Mapping[str, ParametricFit] | None, path, *,
             flops_per_token: FlopsPerToken | Mapping[str, FlopsPerToken] | None = None) -> str:
    """PNG of two panels: left, IsoFLOP curves (loss against N per budget and objective, with each usable
    parabola and its minimum); right, L_opt(C): the IsoFLOP minima and each objective's parametric frontier.
    f(N) per objective: `flops_per_token` (one function or {objective: function}), else from the runs."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    minima = isoflop_minima(points)
    for k, (objective, runs) in enumerate(by_objective(points).items()):
        colour, budgets = colours[k % len(colours)], group_budgets(runs)
        for j, (c, group) in enumerate(budgets):
            shade = 0.35 + 0.65 * (j + 1) / len(budgets)  # darker = more compute
            n = np.array([p.params for p in group])
            left.scatter(n, [p.loss for p in group], color=colour, alpha=shade, s=18,
                         label=objective if j == len(budgets) - 1 else None)
            m = next(m for m in minima if m.objective == objective and m.flops == c)
            if m.coefficients is not None and m.coefficients[0] > 0:
                x = np.linspace(np.log10(n.min()), np.log10(n.max()), 100)
                left.plot(10 ** x, np.polyval(m.coefficients, x), color=colour, alpha=shade, lw=1)
            if m.usable:
                left.scatter([m.n_opt], [m.l_opt], color=colour, marker="*", s=80, edgecolor="k", zorder=3)
        good = [m for m in minima if m.objective == objective and m.usable]
        right.scatter([m.flops for m in good], [m.l_opt for m in good], color=colour, marker="*", s=80,
                      edgecolor="k", zorder=3, label=f"{objective} IsoFLOP minima")
        if fits and objective in fits:
            f = flops_per_token.get(objective) if isinstance(flops_per_token, Mapping) else flops_per_token
            f = f or flops_per_token_from_points(runs)
            c = np.geomspace(budgets[0][0] / 10, budgets[-1][0] * 10, 40)
            right.plot(c, [compute_optimal(fits[objective], x, f)[2] for x in c], color=colour,
                       label=f"{objective} parametric frontier")
    left.set(xscale="log", xlabel="non-embedding parameters N", ylabel="held-out NELBO (nats/token)",
             title="IsoFLOP profiles (darker = more FLOPs, * = parabola minimum)")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="L_opt (nats/token)",
              title="compute-optimal loss")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path)
