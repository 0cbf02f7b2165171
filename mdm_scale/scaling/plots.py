"""The figure of a scaling fit: IsoFLOP profiles beside the compute-optimal loss, so the two approaches can be
compared by eye (approach 2's minima against approach 3's frontier)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mdm_scale.plots import pyplot, save_figure
from mdm_scale.scaling.frontier import FlopsPerToken, MultiplierTrend, compute_optimal, flops_per_token_from_points
from mdm_scale.scaling.isoflop import group_budgets, isoflop_minimum
from mdm_scale.scaling.parametric import ParametricFit
from mdm_scale.scaling.points import Point, by_objective


@dataclass
class FitPlot:
    """The PNG written and what it leaves out: one line per objective whose parametric frontier could not be
    computed at some of the plotted budgets (those stretches are gaps in the line), with the first reason."""

    path: str
    omitted: list[str] = field(default_factory=list)


def plot_fit(points: Sequence[Point], fits: Mapping[str, ParametricFit] | None, path, *,
             flops_per_token: FlopsPerToken | Mapping[str, FlopsPerToken] | None = None, frontier_points: int = 40,
             trends: Mapping[str, MultiplierTrend] | None = None) -> FitPlot:
    """PNG of two panels: left, IsoFLOP curves (loss against N per budget and objective, with each parabola of
    positive curvature and each usable minimum); right, L_opt(C): the usable IsoFLOP minima and each objective's
    parametric frontier at `frontier_points` budgets from a tenth of its smallest to ten times its largest.
    f(N) per objective: `flops_per_token` (one function or {objective: function}), else from the runs. A frontier
    budget where compute_optimal fails (ValueError: its minimum at an end of the searched N) is left out of the
    line and listed in FitPlot.omitted. With `trends` ({"b/a": MultiplierTrend}), a third panel: each compute
    multiplier against the reference's budget, with its bootstrap interval."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3 if trends else 2, figsize=(18 if trends else 12, 4.8))
    left, right = axes[0], axes[1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    omitted = []
    for k, (objective, runs) in enumerate(by_objective(points).items()):
        colour, budgets = colours[k % len(colours)], group_budgets(runs)
        # each budget's minimum from the very group plotted (what isoflop_minima computes), so no matching by C
        minima = [isoflop_minimum(objective, c, group) for c, group in budgets]
        for j, ((c, group), m) in enumerate(zip(budgets, minima)):
            shade = 0.35 + 0.65 * (j + 1) / len(budgets)  # darker = more compute
            n = np.array([p.params for p in group])
            left.scatter(n, [p.loss for p in group], color=colour, alpha=shade, s=18,
                         label=objective if j == len(budgets) - 1 else None)
            if m.coefficients is not None and m.coefficients[0] > 0:
                x = np.linspace(np.log10(n.min()), np.log10(n.max()), 100)
                left.plot(10 ** x, np.polyval(m.coefficients, x), color=colour, alpha=shade, lw=1)
            if m.usable:
                left.scatter([m.n_opt], [m.l_opt], color=colour, marker="*", s=80, edgecolor="k", zorder=3)
        good = [m for m in minima if m.usable]
        right.scatter([m.flops for m in good], [m.l_opt for m in good], color=colour, marker="*", s=80,
                      edgecolor="k", zorder=3, label=f"{objective} IsoFLOP minima")
        if fits and objective in fits:
            f = flops_per_token.get(objective) if isinstance(flops_per_token, Mapping) else flops_per_token
            f = f or flops_per_token_from_points(runs)
            c = np.geomspace(budgets[0][0] / 10, budgets[-1][0] * 10, frontier_points)
            loss, reasons = np.full(len(c), np.nan), []
            for i, x in enumerate(c):
                try:
                    loss[i] = compute_optimal(fits[objective], x, f)[2]
                except ValueError as e:
                    reasons.append((x, str(e)))
            if reasons:
                omitted.append(f"{objective} parametric frontier: {len(reasons)} of {len(c)} budgets between "
                               f"C={reasons[0][0]:.3g} and {reasons[-1][0]:.3g} left out of the plot: "
                               f"{reasons[0][1]}")
            if not np.isnan(loss).all():  # NaN: a gap in the line
                right.plot(c, loss, color=colour, label=f"{objective} parametric frontier")
    left.set(xscale="log", xlabel="non-embedding parameters N", ylabel="held-out NELBO (nats/token)",
             title="IsoFLOP profiles (darker = more FLOPs, * = parabola minimum)")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="L_opt (nats/token)",
              title="compute-optimal loss")
    if trends:
        third = axes[2]
        for k, (name, trend) in enumerate(trends.items()):
            c = np.array(trend.budgets) * 1.04 ** k  # side by side, not on top of each other
            m = np.array([i.estimate for i in trend.intervals])
            # an unbounded end (0 or inf: a resample's fit cannot reach the loss) is drawn as a long bar; the
            # bars are drawn apart from the markers, as a bootstrap interval need not contain the estimate
            low = np.maximum([i.low for i in trend.intervals], 1e-6 * m)
            high = np.minimum([i.high for i in trend.intervals], 1e6 * m)
            g, g_low, g_high = trend.growth_per_decade
            (line,) = third.plot(c, m, marker="o", label=f"{name}: x{g:.2f} per decade [{g_low:.2f}, {g_high:.2f}]")
            third.vlines(c, low, high, color=line.get_color())
        third.axhline(1.0, color="k", lw=0.8, ls="--")
        third.set(xscale="log", yscale="log", xlabel="reference's budget C (its frontier's loss there)",
                  ylabel="compute multiplier at equal loss", title="compute multiplier (95 % bootstrap)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return FitPlot(save_figure(fig, path), omitted)
