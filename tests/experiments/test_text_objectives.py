"""The text comparison of the five objectives: metrics.jsonl is read back into curves, and the --quick pipeline
trains every objective on the embedded corpus (a few steps, a smaller model) and reports finite NELBOs, the exact
AR NLL for `ar`, and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def to(load_experiment):
    return load_experiment("text_objectives")


def test_read_curves_separates_eval_and_training_curves(to, tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/nelbo": 10.5, "eval/tokens": 100}, {"step": 1, "train/loss": 10.9, "train/lr": 0.1},
            {"step": 10, "train/loss": 8.0}, {"step": 10, "eval/nelbo": 7.5}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert to.read_curves(tmp_path) == {"nelbo_curve": [[0, 10.5], [10, 7.5]], "loss_curve": [[1, 10.9], [10, 8.0]]}


def test_configs_differ_only_in_the_objective(to, tmp_path):
    from dataclasses import asdict

    cfgs = {o: asdict(to.run_config(o, 0, tmp_path, steps=10, eval_every=5, log_every=1)) for o in to.OBJECTIVES}
    for o, cfg in cfgs.items():
        assert cfg["data"] == cfgs["mdlm"]["data"] and cfg["model"] == cfgs["mdlm"]["model"]
        assert cfg["optimizer"] == cfgs["mdlm"]["optimizer"] and cfg["train"] == cfgs["mdlm"]["train"]
    assert len({json.dumps(c["objective"], sort_keys=True) for c in cfgs.values()}) == len(to.OBJECTIVES)


def test_quick_pipeline_trains_every_objective(to, tmp_path):
    report = to.main(["--quick", "--out", str(tmp_path / "out")])
    assert [r["objective"] for r in report["records"]] == list(to.OBJECTIVES)
    for r in report["records"]:
        assert math.isfinite(r["heldout_nelbo"]) and 0 < r["heldout_nelbo"] < 20
        assert r["train_tokens"] == 4 * 4 * 128 and r["train_wall_s"] > 0
        assert [s for s, _ in r["loss_curve"]] == [1, 2, 3, 4]  # log_every 1
        assert [s for s, _ in r["nelbo_curve"]] == [0, 2, 4]  # eval_every 2, and at the end
        assert ("exact_nll" in r) == (r["objective"] == "ar")
    ar = next(r for r in report["records"] if r["objective"] == "ar")
    assert math.isfinite(ar["exact_nll"]) and ar["exact_nll"] > 0
    assert "| lomdm |" in report["table"] and json.loads((tmp_path / "out" / "report.json").read_text())["table"]
    assert all(Path(p).exists() for p in report["plots"]) and len(report["plots"]) == 2
