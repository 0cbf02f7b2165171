"""Scaling-law fits (mdm_scale/scaling/: points, isoflop, parametric, frontier; with report.to_json and
plots.plot_fit) against synthetic runs drawn from a known law
L(N, D) = E + A / N^alpha + B / D^beta, so every recovered number has a true value to be checked against."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from mdm_scale.scaling import frontier, parametric
from mdm_scale.scaling.frontier import (MultiplierInterval, UnreachableLoss, compute_for_loss, compute_multiplier,
                                        compute_multiplier_interval, compute_optimal, multiplier_trend)
from mdm_scale.scaling.isoflop import (group_budgets, isoflop_minima, isoflop_scaling, isoflop_scaling_bootstrap,
                                      power_law_fit)
from mdm_scale.scaling.parametric import ParametricFit, bootstrap_parametric, fit_parametric
from mdm_scale.scaling.plots import plot_fit
from mdm_scale.scaling.points import Point
from mdm_scale.scaling.report import to_json

TRUE = ParametricFit(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
SIZES = np.geomspace(1e7, 1e9, 4)
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def six_n(n: float) -> float:
    return 6.0 * n


def synthetic_points(law=TRUE, *, sizes=SIZES, budgets=BUDGETS, flops_per_token=six_n, noise=0.01, seed=0,
                     objective="mdlm") -> list[Point]:
    """One run per (budget, size): D = C / f(N), loss from `law` times log-normal noise of relative size `noise`."""
    rng = np.random.default_rng(seed)
    points = []
    for c in budgets:
        for n in sizes:
            d = c / flops_per_token(n)
            loss = float(law.predict(n, d)) * math.exp(noise * rng.standard_normal())
            points.append(Point(objective, float(n), d, c, loss, run_dir=f"{objective}-C{c:.0e}-N{n:.2e}"))
    return points


def covers(interval, value) -> bool:
    return interval[0] <= value <= interval[1]


# ------------------------------------------------------------------------------------------- parametric fit
def test_huber_gradient_matches_central_differences():
    log_n, log_d, log_l = parametric._arrays(synthetic_points(seed=1))
    for theta in ([6.0, 6.0, 0.5, 0.34, 0.28], [3.0, 8.0, 0.2, 0.6, 0.2]):
        for delta in (1e-3, 1.0):  # linear and quadratic branches of the Huber loss
            def value(t):
                return parametric._huber_objective(np.asarray(t), log_n, log_d, log_l, delta)[0]

            step = 1e-6 * np.eye(5)
            numeric = np.array([(value(theta + h) - value(theta - h)) / 2e-6 for h in step])
            analytic = parametric._huber_objective(np.array(theta), log_n, log_d, log_l, delta)[1]
            np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9)


def test_parametric_fit_recovers_a_noise_free_law():
    fit = fit_parametric(synthetic_points(noise=0.0), restarts=8)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-4), name
    assert fit.converged and fit.objective_value < 1e-10
    assert fit.predict(3e8, 1e10) == pytest.approx(TRUE.predict(3e8, 1e10), rel=1e-8)


def test_parametric_fit_refuses_mixed_objectives_and_too_few_runs():
    with pytest.raises(ValueError, match="one objective"):
        fit_parametric(synthetic_points(objective="mdlm") + synthetic_points(objective="ar"))
    for runs in ([], synthetic_points()[:4]):  # [] once said "fit one objective at a time, got []"
        with pytest.raises(ValueError, match=f"too few runs: {len(runs)} for the 5 parameters.*at least 5"):
            fit_parametric(runs)


def test_a_full_fit_passed_in_gives_the_bootstrap_it_would_compute():
    points = synthetic_points(seed=3)
    own = bootstrap_parametric(points, samples=3, seed=0, restarts=1)
    passed = bootstrap_parametric(points, samples=3, seed=0, restarts=1,
                                  full_fit=fit_parametric(points, restarts=32, seed=0))
    assert passed == own  # exact: the same full fit, the same resamples and refits
    with pytest.raises(ValueError, match="fitted to 16 runs, not these 12"):
        bootstrap_parametric(points[:12], samples=1, full_fit=own.fit)


def test_bootstrap_interval_contains_the_true_law_and_excludes_a_wrong_one():
    result = bootstrap_parametric(synthetic_points(seed=3), samples=40, seed=0, restarts=2)
    assert result.samples == 40 and result.failed <= 4  # failures are counted, and rare here
    for name, wrong in (("alpha", 0.6), ("beta", 0.5), ("E", 2.3)):
        interval = result.intervals[name]
        assert covers(interval, getattr(TRUE, name)), (name, interval)
        assert not covers(interval, wrong), (name, interval)  # negative control: the interval is informative
        assert covers(interval, getattr(result.fit, name))
    a = TRUE.beta / (TRUE.alpha + TRUE.beta)  # N_opt ~ C^a (f = 6N): the closed form behind compute_optimal's test
    assert result.allocation_exponents == pytest.approx({"n_opt_exponent": result.fit.beta / (
        result.fit.alpha + result.fit.beta), "d_opt_exponent": result.fit.alpha / (result.fit.alpha + result.fit.beta)})
    assert covers(result.intervals["n_opt_exponent"], a) and covers(result.intervals["d_opt_exponent"], 1 - a)
    assert not covers(result.intervals["n_opt_exponent"], 0.73)  # it tells a = 0.45 from Kaplan et al.'s 0.73


def test_bootstrap_alpha_interval_covers_the_truth_in_most_replications():
    """20 noise draws, each with its own bootstrap: a 95 % interval should cover the true alpha in most of them
    (>= 14 of 20; a binomial(20, 0.95) falls below that with probability < 1e-4). Small bootstraps keep it fast."""
    hits = [covers(bootstrap_parametric(synthetic_points(seed=100 + rep), samples=30, seed=rep, restarts=1)
                   .intervals["alpha"], TRUE.alpha) for rep in range(20)]
    assert sum(hits) >= 14, hits


# ------------------------------------------------------------------------------------- compute frontier
@pytest.mark.parametrize("flops_per_token,factor", [(six_n, 6.0), (lambda n: 12.0 * n, 12.0)])
def test_compute_optimal_matches_the_closed_form(flops_per_token, factor):
    """With f(N) = k N: N_opt = G (C / k)^(beta / (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha + beta))."""
    a, b = TRUE.alpha, TRUE.beta
    g = (a * TRUE.A / (b * TRUE.B)) ** (1 / (a + b))
    for c in (1e15, 1e19, 1e24):
        n, d, loss = compute_optimal(TRUE, c, flops_per_token)
        assert n == pytest.approx(g * (c / factor) ** (b / (a + b)), rel=1e-5)
        assert d == pytest.approx(c / (factor * n), rel=1e-9) and loss == pytest.approx(TRUE.predict(n, d), rel=1e-12)


def shifted(law: ParametricFit, **changes) -> ParametricFit:
    return dataclasses.replace(law, **changes)


K = 3.0
# Three ways objective b needs K times a's compute for any loss (f = 6N unless given): K times the tokens
# (B K^beta), K times the parameters (A K^alpha), or the same law at K times the FLOPs per token.
CONSTRUCTIONS = {"tokens": (shifted(TRUE, B=TRUE.B * K ** TRUE.beta), six_n, K),
                 "params": (shifted(TRUE, A=TRUE.A * K ** TRUE.alpha), six_n, K),
                 "flops_per_token": (TRUE, lambda n: K * six_n(n), K),
                 "control": (TRUE, six_n, 1.0)}


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_compute_multiplier_recovers_a_known_factor(name):
    law_b, f_b, expected = CONSTRUCTIONS[name]
    for loss in (2.2, 2.8, 3.4):
        assert compute_multiplier(TRUE, law_b, loss, six_n, f_b) == pytest.approx(expected, rel=0.02)


def test_compute_multiplier_refuses_a_loss_below_E():
    with pytest.raises(ValueError, match=r"1\.65.*E=1\.7"):
        compute_multiplier(TRUE, TRUE, 1.65, six_n, six_n)


def test_compute_for_loss_tells_an_unreachable_loss_from_a_failed_search():
    with pytest.raises(UnreachableLoss, match=r"at or below .*E=1\.7"):
        compute_for_loss(TRUE, 1.65, six_n)
    with pytest.raises(UnreachableLoss, match=r"not reached by C=1e\+40"):  # above E, but only by 1e-9
        compute_for_loss(TRUE, TRUE.E + 1e-9, six_n)
    # f(N) constant: D = C / f does not fall as N grows, so the loss falls all the way to N = C, the searched end
    with pytest.raises(ValueError, match="end of the searched range") as failure:
        compute_for_loss(TRUE, 2.8, lambda n: 6e8)
    assert not isinstance(failure.value, UnreachableLoss)


def test_compute_for_loss_starts_where_the_frontier_has_an_interior_optimum():
    """A law fitted at small widths (small A, f(N) ~ N^0.6): below C ~ 1e9 its N_opt falls under one parameter, the
    end of compute_optimal's range. The search starts at the first decade with an interior optimum instead of
    failing at C = 1e6, and finds the C whose frontier loss is the target."""
    law = ParametricFit(E=0.5, A=3.0, B=60.0, alpha=0.1, beta=0.3)

    def f(n):
        return 2.2e5 * (n / 1.2e4) ** 0.6

    with pytest.raises(ValueError, match="end of the searched range"):
        compute_optimal(law, 1e8, f)
    c = compute_for_loss(law, 2.5, f)
    assert compute_optimal(law, c, f)[2] == pytest.approx(2.5, abs=1e-9) and 1e11 < c < 1e12
    with pytest.raises(ValueError, match=r"reached below C=1e\+09"):  # the frontier starts below 4.3 there
        compute_for_loss(law, 4.3, f)


@pytest.mark.parametrize("error", [ValueError, UnreachableLoss])
def test_multiplier_interval_keeps_failed_searches_apart_from_unreachable_losses(monkeypatch, error):
    """b's compute_for_loss fails in every other resample (after the estimate): a failed search (ValueError, e.g.
    compute_optimal's minimum at the end of its range) is left out and counted in `errors` with its message; only
    UnreachableLoss counts as an infinite ratio. Before the two were told apart, both gave ratio inf."""
    law_b, _, k = CONSTRUCTIONS["tokens"]
    points_a = synthetic_points(noise=0.003, seed=7)
    points_b = synthetic_points(law_b, noise=0.003, seed=8, objective="ar")

    def f_b(n):  # b's own f, so that b's calls can be told from a's
        return six_n(n)

    real, calls, raised = frontier.compute_for_loss, [], []
    message = "compute-optimal N at C=1e+20 lies at the end of the searched range [1, 1e+20]: check flops_per_token"

    def every_other_b_fails(fit, loss, f, **kwargs):
        if f is f_b:
            calls.append(fit)
            if len(calls) % 2 == 0:  # call 1 is the estimate's
                raised.append(fit)
                raise error(message)
        return real(fit, loss, f, **kwargs)

    monkeypatch.setattr(frontier, "compute_for_loss", every_other_b_fails)
    result = compute_multiplier_interval(points_a, points_b, 2.8, six_n, f_b, samples=12, seed=1, restarts=1)
    assert len(raised) >= 4
    if error is UnreachableLoss:
        assert result.unreachable == len(raised) and result.high == math.inf
        assert result.errors == 0 and result.error_messages == []
    else:
        assert result.unreachable == 0 and math.isfinite(result.high) and result.low <= k <= result.high
        assert result.errors == len(raised) and result.error_messages == [message]
    assert result.failed + result.both_unreachable <= 2


def test_multiplier_interval_passes_its_fit_settings_to_every_fit(monkeypatch):
    real, settings = frontier.fit_parametric, []

    def spy(points, **kwargs):
        settings.append((kwargs["restarts"], kwargs["huber_delta"]))
        return real(points, **kwargs)

    monkeypatch.setattr(frontier, "fit_parametric", spy)  # the refits
    monkeypatch.setattr(parametric, "fit_parametric", spy)  # the full fits (parametric._full_fit)
    points_b = synthetic_points(CONSTRUCTIONS["tokens"][0], noise=0.003, seed=8, objective="ar")
    compute_multiplier_interval(synthetic_points(noise=0.003, seed=7), points_b, 2.8, six_n, samples=2, seed=1,
                                restarts=1, full_fit_restarts=3, huber_delta=0.01)
    assert settings == [(3, 0.01)] * 2 + [(1, 0.01)] * 4  # two full fits, then two refits per resample


def test_compute_multiplier_interval_contains_the_known_factor():
    law_b, _, k = CONSTRUCTIONS["tokens"]
    points_a = synthetic_points(noise=0.003, seed=7)
    points_b = synthetic_points(law_b, noise=0.003, seed=8, objective="ar")
    result = compute_multiplier_interval(points_a, points_b, 2.8, six_n, samples=24, seed=1, restarts=1)
    assert result.low <= k <= result.high and result.low < result.high
    assert result.estimate == pytest.approx(k, rel=0.25)
    assert not (result.low <= 1.0 <= result.high)  # negative control: "no difference" is excluded
    assert result.failed + result.unreachable + result.both_unreachable + result.errors <= 4
    assert tuple(result) == (result.estimate, result.low, result.high)


@pytest.mark.parametrize("law_b", [CONSTRUCTIONS["tokens"][0], shifted(TRUE, beta=0.24)], ids=["constant", "widening"])
def test_multiplier_trend_recovers_how_the_gap_changes_with_compute(law_b):
    """At the loss a's true frontier reaches at each budget, the multiplier and its growth per decade of C are those
    of the true laws: K at every budget (growth 1) when b needs K times the tokens; growing when b's data term
    decays more slowly (beta 0.24 < 0.28), and then "no change" is excluded."""
    points_a = synthetic_points(noise=0.003, seed=7)
    points_b = synthetic_points(law_b, noise=0.003, seed=8, objective="ar")
    trend = multiplier_trend(points_a, points_b, BUDGETS[::-1], six_n, samples=24, seed=1, restarts=1)
    losses = [compute_optimal(TRUE, c, six_n)[2] for c in BUDGETS]
    true = [compute_multiplier(TRUE, law_b, loss, six_n) for loss in losses]
    growth = (true[-1] / true[0]) ** (1 / math.log10(BUDGETS[-1] / BUDGETS[0]))
    assert trend.budgets == list(BUDGETS) and trend.losses == pytest.approx(losses, rel=0.01)  # sorted by C
    for interval, m in zip(trend.intervals, true):
        assert interval.estimate == pytest.approx(m, rel=0.25) and interval.low <= m <= interval.high
    assert trend.growth_samples >= 20 and covers(trend.growth_per_decade[1:], growth)
    assert covers(trend.growth_per_decade[1:], 1.0) == (law_b.beta == TRUE.beta)
    with pytest.raises(ValueError, match="2 distinct budgets"):
        multiplier_trend(points_a, points_b, [1e19, 1e19], six_n, samples=2)


# ------------------------------------------------------------------------------------- approach 2: IsoFLOP
def test_isoflop_minima_recover_the_true_optimal_size_exponent():
    """Noise-free runs on windows centred on the 20-tokens-per-parameter heuristic N = sqrt(C / 120), which is
    not the true optimum (its exponent is 0.5): the parabola minima must find the true exponent
    beta / (alpha + beta) = 0.4516 from compute_optimal, within 0.01. FLOPs jitter by up to 2 % around a budget."""
    budgets = np.geomspace(1e18, 1e21, 4)
    points = []
    for c in budgets:
        centre = math.sqrt(c / 120)
        for j, n in enumerate(np.geomspace(centre / 4, centre * 4, 7)):
            flops = c * (1 + 0.02 * math.sin(j))
            d = flops / six_n(n)
            points.append(Point("mdlm", n, d, flops, float(TRUE.predict(n, d))))
    minima = isoflop_minima(points)
    assert len(minima) == 4 and all(m.usable for m in minima)
    laws = isoflop_scaling(minima)
    true = [compute_optimal(TRUE, c, six_n) for c in budgets]
    for fitted, index in ((laws.n_opt, 0), (laws.d_opt, 1)):
        assert fitted.exponent == pytest.approx(power_law_fit(budgets, [t[index] for t in true]).exponent, abs=0.01)
    assert abs(laws.n_opt.exponent - 0.5) > 0.04  # the window centres' exponent would fail
    assert laws.l_opt.exponent == pytest.approx(power_law_fit(budgets, [t[2] for t in true]).exponent, abs=0.002)
    for m, (n, d, loss) in zip(minima, true):
        assert m.n_opt == pytest.approx(n, rel=0.05) and m.d_opt == pytest.approx(d, rel=0.05)
        assert m.l_opt == pytest.approx(loss, rel=1e-3)


def test_budgets_group_within_five_percent_of_their_smallest_run():
    points = [Point("mdlm", 1e7 * (i + 1), 1e9, c, 3.0) for i, c in enumerate([1.0e18, 1.03e18, 1.045e18, 1.08e18])]
    groups = group_budgets(points)
    assert [len(g) for _, g in groups] == [3, 1]  # 1.08 is 8 % above 1.0: a new budget, not a chain of 3 % steps
    assert groups[0][0] == pytest.approx(math.exp(np.mean(np.log([1.0e18, 1.03e18, 1.045e18]))))
    assert [len(g) for _, g in group_budgets(points, budgets=[1e18, 1.12e18])] == [3, 1]
    with pytest.raises(ValueError, match="within 5% of no budget"):
        group_budgets(points, budgets=[1e18])


def test_isoflop_budgets_without_a_minimum_are_refused_with_a_reason():
    two_sizes = synthetic_points(sizes=[1e8, 3e8], budgets=[1e19], noise=0.0)
    concave = [Point("mdlm", n, 1e9, 1e19, 3.0 - 0.1 * (math.log10(n) - 8) ** 2) for n in (1e7, 1e8, 1e9)]
    edge = [Point("mdlm", n, 1e19 / (6 * n), 1e19, 3.0 + 0.1 * (math.log10(n) - 6) ** 2) for n in (1e7, 1e8, 1e9)]
    for points, reason in ((two_sizes, "2 model size"), (concave, "curvature"), (edge, "outside the sizes run")):
        (minimum,) = isoflop_minima(points)
        assert not minimum.usable and reason in minimum.reason
        assert minimum.n_opt is None and minimum.d_opt is None and minimum.l_opt is None
        assert (minimum.coefficients is None) == (reason == "2 model size")  # the parabola is kept for the plot
    (extrapolated,) = isoflop_minima(edge, extrapolate=True)
    assert extrapolated.usable and extrapolated.n_opt == pytest.approx(1e6)
    with pytest.raises(ValueError, match="0 usable budget"):
        isoflop_scaling(isoflop_minima(two_sizes))


def test_isoflop_exponent_intervals_cover_the_estimate_and_widen_with_noise():
    """Resampling each budget's runs: the interval holds the all-runs exponent, is wider for noisier runs, and a
    grid that can never give 2 usable budgets is refused, not reported as an interval."""
    widths = []
    for noise in (0.002, 0.02):
        points = synthetic_points(noise=noise, seed=3)
        estimate = isoflop_scaling(isoflop_minima(points))
        boot = isoflop_scaling_bootstrap(points, samples=64, seed=0)
        assert boot.failed < boot.samples // 2
        for key in ("n_opt", "d_opt", "l_opt"):
            assert covers(boot.intervals[key], getattr(estimate, key).exponent), (noise, key)
        widths.append(boot.intervals["n_opt"][1] - boot.intervals["n_opt"][0])
    assert widths[1] > 1.5 * widths[0] > 0  # 2.1x here: much of the width is which sizes a resample keeps
    with pytest.raises(ValueError, match="no resample of 8 kept 2 usable budgets"):
        isoflop_scaling_bootstrap(synthetic_points(budgets=[1e20], noise=0.01), samples=8)


def test_point_refuses_non_positive_values():
    with pytest.raises(ValueError, match="loss"):
        Point("mdlm", 1e8, 1e9, 6e17, float("nan"))


# ------------------------------------------------------------------------------------------------ output
def test_results_serialise_to_strict_json():
    points = synthetic_points(noise=0.0) + synthetic_points(sizes=[1e8, 3e8], budgets=[1e22], noise=0.0)
    interval = MultiplierInterval(2.8, 3.0, 2.0, math.inf, 10, 0, 1)
    text = to_json({"minima": isoflop_minima(points), "fit": fit_parametric(points, restarts=2),
                    "multiplier": interval})
    loaded = json.loads(text)
    assert loaded["multiplier"]["high"] == "inf" and loaded["fit"]["alpha"] == pytest.approx(TRUE.alpha, rel=1e-3)
    assert loaded["minima"][-1]["usable"] is False and loaded["minima"][-1]["n_opt"] is None  # 2 sizes at 1e22


def test_plot_fit_writes_a_png(tmp_path):
    law_b = CONSTRUCTIONS["tokens"][0]
    sizes = np.geomspace(3e7, 3e9, 5)
    points = synthetic_points(sizes=sizes, noise=0.0) + synthetic_points(law_b, sizes=sizes, noise=0.0,
                                                                          objective="ar")
    plot = plot_fit(points, {"mdlm": TRUE, "ar": law_b}, tmp_path / "fit.png")
    data = open(plot.path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert plot.omitted == []
    # with a multiplier trend: a third panel beside the two. One interval is unbounded above, one reaches 0 (a
    # resample whose reference fit cannot reach the loss), one lies above its estimate (a bootstrap interval need
    # not contain the estimate; matplotlib's errorbar refused that as a negative yerr)
    intervals = [MultiplierInterval(2.5, 3.0, 3.2, 3.5, 8, 0, 0), MultiplierInterval(2.4, 3.0, 0.0, 3.5, 8, 0, 1),
                 MultiplierInterval(2.3, 3.1, 2.0, math.inf, 8, 0, 1)]
    trend = frontier.MultiplierTrend([1e18, 1e19, 1e21], [2.5, 2.4, 2.3], intervals, (1.01, 0.9, 1.2), 7)
    wide = plot_fit(points, {"mdlm": TRUE, "ar": law_b}, tmp_path / "trend.png", trends={"ar/mdlm": trend})
    width = lambda png: int.from_bytes(open(png, "rb").read()[16:20], "big")  # noqa: E731  (PNG IHDR width)
    assert width(wide.path) > 1.4 * width(plot.path) and wide.omitted == []


# N and D barely pay (exponents 0.05) and tokens pay less than parameters (B << A): below C ~ 1.3e21 (f = 6N) the
# frontier's N_opt would pass N = C, the end of the searched range, so D_opt < 1/6 token. Losses 2.6 to 2.9 on the
# synthetic grid, and a noise-free fit recovers the law.
FLAT_IN_N = ParametricFit(E=1.7, A=2.5, B=0.2, alpha=0.05, beta=0.05)


def test_plot_fit_leaves_out_a_frontier_it_cannot_compute_and_says_so(tmp_path):
    plot = plot_fit(synthetic_points(noise=0.0), {"mdlm": FLAT_IN_N}, tmp_path / "fit.png", flops_per_token=six_n)
    assert open(plot.path, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    (line,) = plot.omitted
    left_out = int(line.split(": ")[1].split(" of 40")[0])
    assert line.startswith("mdlm parametric frontier") and "end of the searched range" in line
    assert 0 < left_out < 40, line  # part of the line is drawn, the rest is named
