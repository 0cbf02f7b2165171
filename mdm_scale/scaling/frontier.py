"""The compute-optimal frontier of a parametric law, and how much compute one objective needs against another.

Nothing here assumes C = 6 N D: the frontier takes a FLOPs-per-token function f(N), so that D = C / f(N) (the
points' own C / D gives f when none is supplied, `flops_per_token_from_points`), because the objectives compared
spend different FLOPs per token.

Compute-optimal frontier (`compute_optimal`): L_opt(C) = min_N L(N, C / f(N)), minimised numerically over log N.
Compute multiplier (`compute_multiplier`): C_b(L) / C_a(L), where C_x(L) solves L_opt_x(C) = L; it exists only for
L > E_x. Its trend (`multiplier_trend`): the multiplier at the loss a reaches at each of its budgets, and its
growth per decade of C, all with bootstrap intervals: whether b's gap to a widens or narrows with compute.
A loss no compute reaches raises `UnreachableLoss`; every other ValueError (a frontier at the end of its searched
range, a loss reached below the smallest C searched) is a failure of the search, never "unreachable".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from mdm_scale.scaling.isoflop import percentile_interval, power_law_fit
from mdm_scale.scaling.parametric import ParametricFit, _full_fit, _resample, _theta, fit_parametric
from mdm_scale.scaling.points import Point

FlopsPerToken = Callable[[float], float]


class UnreachableLoss(ValueError):
    """The loss is at or below the law's irreducible loss E, or the frontier is still above it at the largest C
    searched: no compute (in range) reaches it. A ValueError, so callers that only refuse keep working; callers
    that read it as an infinite compute catch this class alone."""


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
    """The FLOPs at which the compute-optimal frontier reaches `loss` (brentq in log C). The search starts at the
    first decade from flops_range[0] up at which the frontier has an interior optimum: at tiny C a law's N_opt can
    fall below one parameter (sooner when f(N) grows slower than N, as at small widths), which is outside the law's
    domain, not a failure. UnreachableLoss if the loss is at or below E or the frontier is still above it at
    flops_range[1]; ValueError if the loss is reached below that start or compute_optimal fails at every decade."""
    if loss <= fit.E:
        raise UnreachableLoss(f"loss {loss:.6g} is at or below the fit's irreducible loss E={fit.E:.6g}: "
                              f"no amount of compute reaches it")

    def gap(log_c: float) -> float:
        return compute_optimal(fit, math.exp(log_c), flops_per_token)[2] - loss

    low, high = (math.log(c) for c in flops_range)
    gap_high = gap(high)
    if gap_high > 0:
        raise UnreachableLoss(f"loss {loss:.6g} is not reached by C={flops_range[1]:.3g} (frontier there "
                              f"{gap_high + loss:.6g}, E={fit.E:.6g})")
    while True:  # the first decade whose frontier has an interior optimum
        try:
            gap_low = gap(low)
            break
        except ValueError:
            if low + math.log(10) >= high:
                raise
            low += math.log(10)
    if gap_low < 0:
        raise ValueError(f"loss {loss:.6g} is reached below C={math.exp(low):.3g} (frontier there "
                         f"{gap_low + loss:.6g}): widen flops_range")
    return math.exp(brentq(gap, low, high, xtol=1e-12, rtol=1e-12))


def compute_multiplier(fit_a: ParametricFit, fit_b: ParametricFit, loss: float, flops_per_token_a: FlopsPerToken,
                       flops_per_token_b: FlopsPerToken | None = None) -> float:
    """C_b(L) / C_a(L): how many times a's compute b needs to reach `loss` when both train compute-optimally
    (> 1: b is less compute-efficient). f_b defaults to f_a."""
    c_a = compute_for_loss(fit_a, loss, flops_per_token_a)
    return compute_for_loss(fit_b, loss, flops_per_token_b or flops_per_token_a) / c_a


MAX_ERROR_MESSAGES = 5  # a message names its C, so nearly every failed resample's differs


@dataclass
class MultiplierInterval:
    """compute_multiplier on all runs and its bootstrap interval; unpacks as (estimate, low, high). Every one of
    the `samples` resamples lands in exactly one of: the interval's ratios (`unreachable` of them with one fit
    unable to reach the loss, UnreachableLoss, counted as ratio 0 if a cannot, inf if b cannot), `failed` (a refit
    did not converge), `both_unreachable` (neither fit reaches the loss: no ratio) and `errors` (compute_for_loss
    failed otherwise, e.g. a frontier at the end of its searched range; the first distinct messages, at most
    MAX_ERROR_MESSAGES, in `error_messages`). The last three are left out of the interval. `compute_a` and
    `compute_b` are the full fits' C_a(L) and C_b(L) behind the estimate (None where not computed), so a reader can
    see whether each lies inside the budgets its objective's runs cover or is its law extrapolated."""

    loss: float
    estimate: float
    low: float
    high: float
    samples: int
    failed: int
    unreachable: int
    both_unreachable: int = 0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    compute_a: float | None = None
    compute_b: float | None = None

    def __iter__(self):
        return iter((self.estimate, self.low, self.high))


def compute_multiplier_interval(points_a: Sequence[Point], points_b: Sequence[Point], loss: float,
                                flops_per_token_a: FlopsPerToken, flops_per_token_b: FlopsPerToken | None = None, *,
                                samples: int = 200, seed: int = 0, restarts: int = 4, full_fit_restarts: int = 32,
                                huber_delta: float = 1e-3, percentiles: tuple[float, float] = (2.5, 97.5),
                                fit_a: ParametricFit | None = None, fit_b: ParametricFit | None = None
                                ) -> MultiplierInterval:
    """The multiplier's uncertainty from both objectives' runs at once: each resample redraws a's runs and b's
    runs (each with replacement), refits both and takes the ratio. Interval ends are order statistics
    (np.percentile lower / higher), so infinite ratios stay infinite rather than being interpolated.

    The estimate uses the full fits fit_parametric(points_x, restarts=full_fit_restarts, seed=seed,
    huber_delta=huber_delta); `fit_a` / `fit_b` pass in that fit when the caller has it (computed once per
    report), and the refits start from it. A loss the full fits cannot reach, or any other failure of the
    estimate, raises (ValueError; UnreachableLoss for the former); the resamples' outcomes are counted
    (MultiplierInterval)."""
    intervals, _ = _multiplier_bootstrap(points_a, points_b, [loss], flops_per_token_a, flops_per_token_b,
                                         samples=samples, seed=seed, restarts=restarts,
                                         full_fit_restarts=full_fit_restarts, huber_delta=huber_delta,
                                         percentiles=percentiles, fit_a=fit_a, fit_b=fit_b)
    return intervals[0]


@dataclass
class MultiplierTrend:
    """Does b's compute multiplier against a grow or shrink with compute? The multiplier at the loss a's
    compute-optimal frontier reaches at each of a's budgets (`intervals`, one per budget), and its change per
    decade of C between the first and last budget, g = (m_last / m_first)^(1 / log10(C_last / C_first)):
    g > 1, b falls further behind a (or its lead shrinks) as compute grows. `growth_per_decade` is
    (estimate, low, high), the interval from the resamples that gave a finite, positive multiplier at both ends
    (`growth_samples` of them)."""

    budgets: list[float]
    losses: list[float]
    intervals: list[MultiplierInterval]
    growth_per_decade: tuple[float, float, float]
    growth_samples: int


def multiplier_trend(points_a: Sequence[Point], points_b: Sequence[Point], budgets: Sequence[float],
                     flops_per_token_a: FlopsPerToken, flops_per_token_b: FlopsPerToken | None = None, *,
                     samples: int = 200, seed: int = 0, restarts: int = 4, full_fit_restarts: int = 32,
                     huber_delta: float = 1e-3, percentiles: tuple[float, float] = (2.5, 97.5),
                     fit_a: ParametricFit | None = None, fit_b: ParametricFit | None = None) -> MultiplierTrend:
    """compute_multiplier_interval at the losses L_k = L_opt_a(C_k) of a's full fit at each budget C_k (at least
    2 distinct), all from one bootstrap, and the multiplier's growth per decade of C (MultiplierTrend). The losses
    stay fixed across resamples: the question is asked at the same losses each time."""
    budgets = sorted(float(c) for c in budgets)
    if len(set(budgets)) < 2:
        raise ValueError(f"a trend needs at least 2 distinct budgets, got {budgets}")
    fit_a = _full_fit(points_a, fit_a, full_fit_restarts, seed, huber_delta)
    losses = [compute_optimal(fit_a, c, flops_per_token_a)[2] for c in budgets]
    intervals, ratios = _multiplier_bootstrap(points_a, points_b, losses, flops_per_token_a, flops_per_token_b,
                                              samples=samples, seed=seed, restarts=restarts,
                                              full_fit_restarts=full_fit_restarts, huber_delta=huber_delta,
                                              percentiles=percentiles, fit_a=fit_a, fit_b=fit_b)
    decades = math.log10(budgets[-1] / budgets[0])

    def growth(first: float, last: float) -> float:
        return (last / first) ** (1 / decades)

    ends = [growth(r[0], r[-1]) for r in ratios
            if r[0] is not None and r[-1] is not None and 0 < r[0] < math.inf and 0 < r[-1] < math.inf]
    if not ends:
        raise RuntimeError(f"no bootstrap resample of {samples} gave a finite multiplier at both {budgets[0]:.3g} "
                           f"and {budgets[-1]:.3g} FLOPs")
    low, high = percentile_interval(ends, percentiles)
    return MultiplierTrend(budgets, [float(v) for v in losses], intervals,
                           (growth(intervals[0].estimate, intervals[-1].estimate), low, high), len(ends))


def _multiplier_bootstrap(points_a, points_b, losses: Sequence[float], flops_per_token_a: FlopsPerToken,
                          flops_per_token_b: FlopsPerToken | None, *, samples: int, seed: int, restarts: int,
                          full_fit_restarts: int, huber_delta: float, percentiles: tuple[float, float],
                          fit_a: ParametricFit | None, fit_b: ParametricFit | None
                          ) -> tuple[list[MultiplierInterval], list[list[float | None]]]:
    """One interval per loss from one set of resamples (each resample's two refits serve every loss), and each
    resample's ratios by loss (None: that resample gave none at that loss; left out of `failed` resamples)."""
    f_b = flops_per_token_b or flops_per_token_a
    fit_a, fit_b = (_full_fit(p, given, full_fit_restarts, seed, huber_delta)
                    for p, given in ((points_a, fit_a), (points_b, fit_b)))
    computes = [(compute_for_loss(fit_a, loss, flops_per_token_a), compute_for_loss(fit_b, loss, f_b))
                for loss in losses]  # as compute_multiplier, keeping both C
    rng = np.random.default_rng(seed)
    count = len(losses)
    unreachable, both_unreachable, errors = [0] * count, [0] * count, [0] * count
    messages: list[list[str]] = [[] for _ in range(count)]
    failed, per_resample = 0, []
    for _ in range(samples):
        refits = [fit_parametric(_resample(p, rng), restarts=restarts, seed=int(rng.integers(2 ** 31)),
                                 huber_delta=huber_delta, starts=[_theta(full)])
                  for p, full in ((points_a, fit_a), (points_b, fit_b))]
        if not all(r.converged for r in refits):
            failed += 1
            continue
        row: list[float | None] = []
        for k, loss in enumerate(losses):
            c = []
            try:
                for refit, f in zip(refits, (flops_per_token_a, f_b)):
                    try:
                        c.append(compute_for_loss(refit, loss, f))
                    except UnreachableLoss:
                        c.append(math.inf)
            except ValueError as e:  # not "unreachable": a failed search, kept out of the interval and reported
                errors[k] += 1
                if len(messages[k]) < MAX_ERROR_MESSAGES and str(e) not in messages[k]:
                    messages[k].append(str(e))
                row.append(None)
                continue
            if math.isinf(c[0]) and math.isinf(c[1]):
                both_unreachable[k] += 1
                row.append(None)
                continue
            unreachable[k] += any(math.isinf(x) for x in c)
            row.append(c[1] / c[0])
        per_resample.append(row)
    intervals = []
    for k, loss in enumerate(losses):
        ratios = [row[k] for row in per_resample if row[k] is not None]
        if not ratios:
            raise RuntimeError(f"no bootstrap resample of {samples} gave a multiplier at loss {loss:.4g}: {failed} "
                               f"refits did not converge, {both_unreachable[k]} reached the loss with neither fit, "
                               f"{errors[k]} failed ({'; '.join(messages[k][:3])})")
        low, high = percentile_interval(ratios, percentiles)
        c_a, c_b = computes[k]
        intervals.append(MultiplierInterval(float(loss), c_b / c_a, low, high, samples, failed, unreachable[k],
                                            both_unreachable[k], errors[k], messages[k], c_a, c_b))
    return intervals, per_resample
