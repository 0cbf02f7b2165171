"""The compute-optimal frontier of a parametric law, and how much compute one objective needs against another.

Nothing here assumes C = 6 N D: the frontier takes a FLOPs-per-token function f(N), so that D = C / f(N) (the
points' own C / D gives f when none is supplied, `flops_per_token_from_points`), because the objectives compared
spend different FLOPs per token.

Compute-optimal frontier (`compute_optimal`): L_opt(C) = min_N L(N, C / f(N)), minimised numerically over log N.
Compute multiplier (`compute_multiplier`): C_b(L) / C_a(L), where C_x(L) solves L_opt_x(C) = L; it exists only for
L > E_x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from mdm_scale.scaling.isoflop import power_law_fit
from mdm_scale.scaling.parametric import ParametricFit, _resample, _theta, fit_parametric
from mdm_scale.scaling.points import Point

FlopsPerToken = Callable[[float], float]


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
