"""`python -m mdm_scale.scaling fit`'s report (mdm_scale/scaling/report.py) on runs drawn from known laws: the
multiplier it prints is the one built into the data, and every part of the report is there."""

from __future__ import annotations

import json

import pytest

from mdm_scale.scaling.report import fit_report
from tests.mdm_scale.test_scaling_fit import CONSTRUCTIONS, synthetic_points


def test_report_recovers_a_built_in_compute_multiplier(tmp_path):
    law_b, _, k = CONSTRUCTIONS["tokens"]
    points = synthetic_points(noise=0.003, seed=7) + synthetic_points(law_b, noise=0.003, seed=8, objective="ar")
    report = fit_report(points, samples=16, reference=points[0].objective, out=tmp_path)
    (key,) = report["multipliers"]
    assert key == f"ar/{points[0].objective}"
    multiplier = report["multipliers"][key]
    assert multiplier["estimate"] == pytest.approx(k, rel=0.25) and multiplier["low"] <= k <= multiplier["high"]
    for entry in report["objectives"].values():
        assert {"isoflop_minima", "isoflop_scaling", "parametric", "bootstrap"} <= set(entry)
    assert json.loads((tmp_path / "fit.json").read_text()) == report
    assert (tmp_path / "fit.png").stat().st_size > 10_000
