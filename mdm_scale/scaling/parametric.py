"""Chinchilla's approach 3 (Hoffmann et al. 2022): one law L(N, D) fitted to all of an objective's runs.

    L(N, D) = E + A / N^alpha + B / D^beta,

with a = log A, b = log B, e = log E, minimising over (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3,

by L-BFGS-B from many initial points (`fit_parametric`); `bootstrap_parametric` resamples runs for percentile
intervals, since the law's parameters are only as certain as the few runs that pin them down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from mdm_scale.scaling.points import Point, by_objective

PARAMETERS = ("E", "A", "B", "alpha", "beta")


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

    def allocation_exponents(self) -> dict[str, float]:
        """Chinchilla's a = beta / (alpha + beta) and b = alpha / (alpha + beta): N_opt ~ C^a and D_opt ~ C^b,
        exact when F = k N (approach 3's closed form); with attention and the output layer in F, as at small
        widths, the frontier's local slopes differ (frontier.compute_optimal computes them exactly)."""
        total = self.alpha + self.beta
        return {"n_opt_exponent": self.beta / total, "d_opt_exponent": self.alpha / total}


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


def _single_threaded_blas():
    """Every BLAS library (threadpoolctl user_api="blas": OpenBLAS, MKL, BLIS) on one thread while L-BFGS-B runs.
    Since scipy 1.15 L-BFGS-B calls LAPACK on 5 x 5-sized problems, and a threaded OpenBLAS makes each call wait
    for its threads: 25 ms instead of 0.1 ms per step on a busy 2-core machine (scipy issues 22438, 23191; botorch
    limits threads the same way)."""
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
    if len(points) < len(PARAMETERS):
        raise ValueError(f"too few runs: {len(points)} for the {len(PARAMETERS)} parameters of L(N, D) = "
                         f"E + A / N^alpha + B / D^beta; a parametric fit needs at least {len(PARAMETERS)}")
    if len(by_objective(points)) != 1:
        raise ValueError(f"fit one objective at a time, got {sorted(by_objective(points))}")
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
    with _single_threaded_blas():
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
    """Per parameter (PARAMETERS), and per allocation exponent (ParametricFit.allocation_exponents)."""
    allocation_exponents: dict[str, float] = field(default_factory=dict)
    """The full fit's allocation exponents, whose intervals `intervals` holds."""


def _resample(points: Sequence[Point], rng: np.random.Generator) -> list[Point]:
    return [points[i] for i in rng.integers(0, len(points), len(points))]


def _full_fit(points: Sequence[Point], given: ParametricFit | None, restarts: int, seed: int, huber_delta: float
              ) -> ParametricFit:
    """The fit on all runs that a bootstrap starts from: `given` when the caller already has it (it must be
    fit_parametric(points, restarts=restarts, seed=seed, huber_delta=huber_delta); its number of runs is checked),
    else that fit."""
    if given is None:
        return fit_parametric(points, restarts=restarts, seed=seed, huber_delta=huber_delta)
    if given.num_points != len(points):
        raise ValueError(f"the full fit passed in was fitted to {given.num_points} runs, not these {len(points)}")
    return given


def bootstrap_parametric(points: Sequence[Point], *, samples: int = 200, seed: int = 0, restarts: int = 4,
                         percentiles: tuple[float, float] = (2.5, 97.5), huber_delta: float = 1e-3,
                         full_fit_restarts: int = 32, full_fit: ParametricFit | None = None) -> BootstrapResult:
    """How far the runs pin each parameter down: runs are resampled with replacement `samples` times and refitted
    (from the full fit's optimum plus the best `restarts` initial points of the resample). The full fit is
    fit_parametric(points, restarts=full_fit_restarts, seed=seed, huber_delta=huber_delta), or `full_fit` when the
    caller already computed exactly that."""
    full = _full_fit(points, full_fit, full_fit_restarts, seed, huber_delta)
    rng = np.random.default_rng(seed)
    draws, failed = [], 0
    for _ in range(samples):
        refit = fit_parametric(_resample(points, rng), restarts=restarts, seed=int(rng.integers(2 ** 31)),
                               huber_delta=huber_delta, starts=[_theta(full)])
        if refit.converged:
            draws.append([getattr(refit, k) for k in PARAMETERS] + list(refit.allocation_exponents().values()))
        else:
            failed += 1
    if not draws:
        raise RuntimeError(f"all {samples} bootstrap refits failed to converge")
    bounds = np.percentile(np.array(draws), percentiles, axis=0)  # [2, 7]
    names = list(PARAMETERS) + list(full.allocation_exponents())
    intervals = {k: (float(bounds[0, i]), float(bounds[1, i])) for i, k in enumerate(names)}
    return BootstrapResult(full, samples, failed, tuple(percentiles), intervals, full.allocation_exponents())
