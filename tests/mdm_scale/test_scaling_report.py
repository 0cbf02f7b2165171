"""`python -m mdm_scale.scaling fit`'s report (mdm_scale/scaling/report.py) on runs drawn from known laws: the
multiplier it prints is the one built into the data, and every part of the report is there."""

from __future__ import annotations

import json

import pytest

from mdm_scale.scaling import report as report_module
from mdm_scale.scaling.report import fit_report
from mdm_scale.scaling.summary import summary_markdown
from tests.mdm_scale.test_scaling_fit import CONSTRUCTIONS, FLAT_IN_N, synthetic_points


def test_report_recovers_a_built_in_compute_multiplier(tmp_path):
    law_b, _, k = CONSTRUCTIONS["tokens"]
    points = synthetic_points(noise=0.003, seed=7) + synthetic_points(law_b, noise=0.003, seed=8, objective="ar")
    report = fit_report(points, samples=16, reference=points[0].objective, out=tmp_path)
    (key,) = report["multipliers"]
    assert key == f"ar/{points[0].objective}"
    multiplier = report["multipliers"][key]
    assert multiplier["estimate"] == pytest.approx(k, rel=0.25) and multiplier["low"] <= k <= multiplier["high"]
    trend = report["multiplier_trends"][key]  # at each of the reference's 4 budgets; the gap does not change
    assert trend["budgets"] == pytest.approx([1e18, 1e19, 1e20, 1e21]) and len(trend["intervals"]) == 4
    assert all(i["low"] <= k <= i["high"] for i in trend["intervals"])
    assert trend["growth_per_decade"][1] <= 1.0 <= trend["growth_per_decade"][2]
    for entry in report["objectives"].values():
        assert {"isoflop_minima", "isoflop_scaling", "parametric", "bootstrap"} <= set(entry)
    assert json.loads((tmp_path / "fit.json").read_text()) == report
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    # fit.md: the same numbers as tables, one row per quantity, from fit.json and points.json alone
    text = (tmp_path / "fit.md").read_text()
    assert text == summary_markdown(json.loads((tmp_path / "fit.json").read_text()), points)
    ar = sorted((p for p in points if p.objective == "ar"), key=lambda p: (p.flops, p.params))
    first_row = f"| {ar[0].flops:.3g} | " + " | ".join(f"{p.loss:.4g}" for p in ar[:4]) + " |"
    assert first_row.replace(f"{ar[0].flops:.3g}", "1e+18") in text  # the 4 sizes of the smallest budget
    alpha = report["objectives"]["ar"]["parametric"]["alpha"]
    low, high = report["objectives"]["ar"]["bootstrap"]["intervals"]["alpha"]
    assert f"| alpha | {alpha:.3g} | [{low:.3g}, {high:.3g}] |" in text
    assert text.count("| a: N_opt ~ C^a |") == 2 and text.count("| b: D_opt ~ C^b |") == 2
    assert multiplier["compute_b"] / multiplier["compute_a"] == pytest.approx(multiplier["estimate"], rel=1e-12)
    assert report["objectives"]["ar"]["budgets"] == pytest.approx([1e18, 1e19, 1e20, 1e21], rel=0.05)
    row = f"| {key} | {multiplier['loss']:.4g} | {multiplier['estimate']:.3g} | "
    assert row in text and f"| {multiplier['compute_a']:.3g} (inside) |" in text and text.count("| 1e+") >= 2 * 4 + 4  # 4 minima per objective, 4 trend budgets
    for entry in report["objectives"].values():  # approach 2's exponents with their intervals
        low, high = entry["isoflop_bootstrap"]["intervals"]["n_opt"]
        assert f"n_opt ~ C^{entry['isoflop_scaling']['n_opt']['exponent']:.3g} [{low:.3g}, {high:.3g}]" in text
    g = trend["growth_per_decade"]
    assert f"g = {g[0]:.3g} [{g[1]:.3g}, {g[2]:.3g}]" in text


def test_report_names_what_its_plot_leaves_out(tmp_path):
    """Runs from a law whose frontier leaves the searched N range below C ~ 1.3e21: the plot draws the rest, the
    report says what is missing and why, and fit.json is written."""
    points = synthetic_points(FLAT_IN_N, noise=0.0)
    report = fit_report(points, samples=2, reference="mdlm", out=tmp_path)
    assert report["objectives"]["mdlm"]["parametric"]["alpha"] == pytest.approx(FLAT_IN_N.alpha, rel=1e-3)
    (line,) = report["plot_omitted"]
    assert line.startswith("mdlm parametric frontier") and "end of the searched range" in line
    assert report["plot"] == str(tmp_path / "fit.png") and json.loads((tmp_path / "fit.json").read_text()) == report


def test_report_is_written_when_the_plot_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(report_module, "plot_fit", broken)
    points = synthetic_points(noise=0.003, seed=7)
    report = fit_report(points, samples=2, reference="mdlm", out=tmp_path)
    assert report["plot"] == "unavailable: RuntimeError: no display" and "plot_omitted" not in report
    assert json.loads((tmp_path / "fit.json").read_text()) == report
    assert report["objectives"]["mdlm"]["parametric"]["converged"] is True


def test_a_fit_can_be_redone_from_its_points_json_alone(tmp_path, capsys):
    """`fit --out` saves its input; `fit --points` on that file (no run directories left) gives the same report,
    and a file that is not one is refused with one line."""
    from mdm_scale.scaling.__main__ import main
    from mdm_scale.scaling.points import read_points

    points = synthetic_points(noise=0.003, seed=7)
    first = fit_report(points, samples=4, out=tmp_path / "first")
    assert read_points(tmp_path / "first" / "points.json") == points
    assert main(["fit", "--points", str(tmp_path / "first" / "points.json"), "--bootstrap", "4",
                 "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "fit.json").read_text())
    assert {k: v for k, v in again.items() if k != "plot"} == {k: v for k, v in first.items() if k != "plot"}
    capsys.readouterr()

    # pooled files (or run directories) that hold the same run count it once, and say so
    import dataclasses

    from mdm_scale.scaling.points import write_points
    named = [dataclasses.replace(p, run_dir=f"runs/grid/run{i}") for i, p in enumerate(points)]
    write_points(named, tmp_path / "named.json")
    write_points(named[:3], tmp_path / "three.json")
    assert main(["fit", "--points", str(tmp_path / "named.json"), str(tmp_path / "three.json"), "--bootstrap", "4",
                 "--out", str(tmp_path / "pooled")]) == 0
    assert read_points(tmp_path / "pooled" / "points.json") == named
    assert capsys.readouterr().err.count("is already read") == 3

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"objective": "mdlm", "params": 1e6, "tokens": 1e9, "flops": 6e15, "loss": -1.0}]))
    assert main(["fit", "--points", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.json" in err and "loss=-1.0" in err
    assert main(["fit"]) == 2 and "run directories, --points files" in capsys.readouterr().err


def test_fit_md_marks_a_compute_outside_its_objectives_runs():
    """A multiplier whose C_b lies 1.5 decades below b's smallest budget, or 0.5 above a's largest, is its law
    extrapolated, and fit.md says so with the distance; a C inside (within a budget's 5 %) is marked inside."""
    interval = {"loss": 2.3, "estimate": 0.1, "low": 0.05, "high": 0.2, "samples": 8, "failed": 0,
                "unreachable": 0, "both_unreachable": 0, "errors": 0}
    report = {"runs": 8, "objectives": {name: {"runs": 4, "budgets": [1e13, 1e14], "best_loss": 2.2}
                                        for name in ("mdlm", "ar")},
              "multipliers": {"ar/mdlm": dict(interval, compute_a=10 ** 14.5, compute_b=10 ** 11.5)},
              "multiplier_trends": {"ar/mdlm": {
                  "budgets": [1e13, 1e14], "losses": [2.4, 2.3], "growth_per_decade": [1.0, 0.5, 2.0],
                  "growth_samples": 8, "intervals": [dict(interval, compute_a=1e13, compute_b=0.96e13),
                                                     dict(interval, compute_a=1e14, compute_b=None)]}}}
    text = summary_markdown(report)
    assert "| 3.16e+14 (0.5 dec above its runs) | 3.16e+11 (1.5 dec below its runs) |" in text
    assert "| 9.6e+12 (inside) |" in text and text.rstrip().count("| - |") == 1
    assert "Budgets run: 1e+13, 1e+14; best run's loss 2.2." in text
