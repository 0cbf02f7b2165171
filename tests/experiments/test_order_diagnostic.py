"""The exact order analysis runs on a synthetic-order output and its numbers are mutually consistent: no order
distribution beats the best fixed order, the optimisers start from the uniform order and only descend, and an
MDM-LS run's own schedule is evaluated, and a LoMDM run's NELBO splits into reconstruction and a non-negative
velocity term."""

from __future__ import annotations

import json
import math

import pytest


def test_order_diagnostic_on_a_quick_run(load_experiment, tmp_path):
    so = load_experiment("synthetic_order")
    diagnostic = load_experiment("order_diagnostic")
    out = tmp_path / "run"
    so.main(["--quick", "--seeds", "0", "--objectives", "mdlm", "mdm_ls", "lomdm", "--out", str(out)])
    report = diagnostic.main(["--run", str(out), "--objectives", "mdlm", "mdm_ls", "lomdm", "--sequences", "3",
                              "--optimizer-steps", "15"])
    assert json.loads((out / "order_diagnostic.json").read_text())["table"] == report["table"]
    by_name = {r["objective"]: r for r in report["records"]}
    assert set(by_name) == {"mdlm", "mdm_ls", "lomdm"}
    for r in by_name.values():
        values = [r[k] for k in ("uniform_pl", "right_to_left", "left_to_right", "family_optimum",
                                 "free_optimum")]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert r["best_order_nelbo"] <= min(values) + 1e-9  # a PL mixture is an average over orders
        assert sorted(r["best_order"]) == list(range(1, 9))
        assert r["free_optimum"] <= r["uniform_pl"] + 1e-9 and r["family_optimum"] <= r["uniform_pl"] + 1e-9
        assert len(r["free_log_w"]) == 8 and sum(r["free_log_w"]) == pytest.approx(0, abs=1e-9)
    assert by_name["mdm_ls"]["own_w_nelbo"] >= by_name["mdm_ls"]["best_order_nelbo"]
    assert "own_w" not in by_name["mdlm"]
    lomdm = by_name["lomdm"]  # its own NELBO = reconstruction (pattern lattice) + velocity term (>= 0)
    assert lomdm["own_w_velocity"] >= 0
    assert lomdm["own_w_reconstruction"] + lomdm["own_w_velocity"] == pytest.approx(lomdm["own_w_nelbo"])
