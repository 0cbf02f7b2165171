"""The synthetic-order experiment: its data generator has the promised structure and the --quick pipeline runs
end to end (three objectives trained, finite held-out NELBOs, learned orders read back, report and plots)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "synthetic_order.py"


@pytest.fixture(scope="module")
def so():
    spec = importlib.util.spec_from_file_location("synthetic_order", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_order"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("synthetic_order", None)


def test_map_is_two_to_one_and_sequences_follow_the_right_neighbour(so):
    f = so.make_map(16, seed=3)
    counts = np.bincount(f, minlength=16)
    assert sorted(set(counts.tolist())) == [0, 2] and (counts == 2).sum() == 8  # not invertible: R2L is unique
    x = so.generate(500, 12, f, noise=0.0, rng=np.random.default_rng(0))
    assert x.shape == (500, 12) and x.min() >= 0 and x.max() < 16
    assert (x[:, :-1] == f[x[:, 1:]]).all()  # x_i = f(x_{i+1}) everywhere
    assert not (x[:, 1:] == f[x[:, :-1]]).all()  # ... and not the other way round
    assert len(np.unique(x[:, -1])) == 16  # the last token is uniform over the alphabet
    noisy = so.generate(4000, 12, f, noise=0.2, rng=np.random.default_rng(1))
    hit = (noisy[:, :-1] == f[noisy[:, 1:]]).mean()
    assert abs(hit - (0.8 + 0.2 / 16)) < 0.01  # resampled w.p. 0.2 (and lands on f(x) w.p. 1/16)


def test_entropy_rate_and_spearman(so):
    f = so.make_map(16, seed=0)
    assert so.true_nll_per_token(f, 8, 0.0) == pytest.approx(math.log(16) / 8)
    assert so.true_nll_per_token(f, 8, 0.1) > so.true_nll_per_token(f, 8, 0.0)
    x = so.generate(20000, 8, f, noise=0.1, rng=np.random.default_rng(2))
    assert so.exact_nll_per_token(x, f, 0.1) == pytest.approx(so.true_nll_per_token(f, 8, 0.1), abs=0.01)
    assert so.spearman([0, 1, 2, 3], [1.0, 2.0, 5.0, 9.0]) == pytest.approx(1.0)
    assert so.spearman([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # Exponents increasing with position = right-to-left generation (larger w = revealed earlier).
    stats = so.generation_order_stats(np.array([0.3, 0.8, 1.5, 4.0]), samples=4000)
    assert stats["p_right_neighbour_first"] > 0.6
    assert np.all(np.diff(stats["mean_generation_step"]) < 0)
    flat = so.generation_order_stats(np.ones(4), samples=4000)
    assert abs(flat["p_right_neighbour_first"] - 0.5) < 0.03


def test_quick_pipeline_reports_finite_nelbos_and_learned_orders(so, tmp_path):
    report = so.main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path / "out")])
    assert report["objectives"] == ["mdlm", "mdm_ls", "lomdm"]
    assert len(report["records"]) == 6
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["summary"].keys() == report["summary"].keys()
    seq_len = report["settings"]["seq_len"]
    for r in report["records"]:
        assert math.isfinite(r["final_nelbo"]) and 0 < r["final_nelbo"] < 20
        assert len(r["evals"]) >= 2
        if r["objective"] == "mdlm":
            assert "exponents" not in r
        else:
            w = np.array(r["exponents"])
            assert w.shape == (seq_len,) and np.all((w >= 0.25) & (w <= 0.25 + report["settings"]["exponent_range"]))
            assert -1 <= r["spearman_position_w"] <= 1
            assert len(r["mean_generation_step"]) == seq_len
    for obj in ("mdm_ls", "lomdm"):
        e = report["summary"][obj]
        assert e["margin_below_mdlm"] == pytest.approx(report["summary"]["mdlm"]["mean"] - e["mean"])
        assert isinstance(e["beats_mdlm_beyond_noise"], bool) and len(e["paired_differences"]) == 2
    assert "| mdlm |" in report["table"] and "| lomdm |" in report["table"]
    for p in report["plots"]:
        assert Path(p).stat().st_size > 1000
