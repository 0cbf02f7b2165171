"""mdm_scale.plots: every plot writes a non-trivial PNG; the order statistics behind them are right; wandb logging
is a no-op without a run and logs images into an offline run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mdm_scale import plots


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_curves_and_heatmaps_write_pngs(tmp_path):
    curves = {"mdlm s0": [(0, 3.0), (100, 1.0), (200, 0.8)], "mdlm s1": [(0, 3.1), (200, 0.9)],
              "mdm_ls s0": [(0, 3.0), (200, 0.6)]}
    paths = [
        plots.training_curves(curves, tmp_path / "a" / "curves.png", title="t", ylabel="nelbo",
                              colors={"mdlm": "gray", "mdm_ls": "blue"}, logy=True, hlines={"floor": 0.5}),
        plots.training_curves(curves, tmp_path / "plain.png", title="t", ylabel="y"),
        plots.exponent_heatmap(np.linspace(0.3, 1.7, 8), tmp_path / "ls.png", title="mdm_ls"),
        plots.exponent_heatmap(np.random.default_rng(0).uniform(0.3, 1.7, (20, 8)), tmp_path / "lo.png"),
        plots.reveal_time_by_position(np.linspace(0.3, 1.7, 8), tmp_path / "rt1.png", samples=2000),
        plots.reveal_time_by_position({"a": np.ones(8), "b": np.random.default_rng(1).uniform(0.3, 1.7, (5, 8))},
                                      tmp_path / "rt2.png", samples=2000, colors={"a": "k"}),
    ]
    for p in paths:
        assert _is_png(p) and (tmp_path / p).stat().st_size > 5000
    with pytest.raises(ValueError):
        plots.exponent_heatmap(np.ones((2, 2, 2)), tmp_path / "bad.png")
    zoomed = plots.training_curves(curves, tmp_path / "zoom.png", title="t", ylabel="y", zoom=(0.5, 1.0))
    width = lambda png: int.from_bytes(Path(png).read_bytes()[16:20], "big")  # noqa: E731  (PNG IHDR width)
    assert _is_png(zoomed) and width(zoomed) > 1.5 * width(paths[1])  # a second panel beside the first


def test_reveal_time_and_generation_steps():
    w = np.array([0.3, 0.8, 1.5, 4.0])
    assert plots.mean_reveal_time(w) == pytest.approx(w / (w + 1))
    assert plots.mean_reveal_time(np.stack([w, w])) == pytest.approx(w / (w + 1))
    steps = plots.sample_generation_steps(w, samples=4000)
    assert steps.shape == (4000, 4) and (np.sort(steps, 1) == np.arange(4)).all()  # each row a permutation
    assert np.all(np.diff(steps.mean(0)) < 0)  # larger w = generated earlier
    # Two positions: P(position 2 first) = w2 / (w1 + w2) (exponential race, Plackett-Luce).
    two = plots.sample_generation_steps([1.0, 3.0], samples=20000, seed=1)
    assert (two[:, 1] == 0).mean() == pytest.approx(0.75, abs=0.015)
    # Per-sample exponents: rows cycle through the samples.
    per = plots.sample_generation_steps(np.array([[1.0, 1e3], [1e3, 1.0]]), samples=1000)
    assert (per[0::2, 1] == 0).mean() > 0.99 and (per[1::2, 0] == 0).mean() > 0.99


def test_log_to_wandb_is_a_noop_without_a_run_and_logs_images_offline(tmp_path, monkeypatch):
    png = plots.training_curves({"a": [(0, 1.0), (1, 0.5)]}, tmp_path / "c.png", title="t", ylabel="y")
    wandb = pytest.importorskip("wandb")
    if wandb.run is not None:
        pytest.skip("a wandb run is already active in this process")
    assert plots.log_to_wandb([png]) is False

    class FakeRun:
        logged = []

        def log(self, data, **kwargs):
            self.logged.append((data, kwargs))

    run = FakeRun()
    assert plots.log_to_wandb([png], run, step=3) is True
    (data, kwargs), = run.logged
    assert list(data) == ["c"] and isinstance(data["c"], wandb.Image) and kwargs == {"step": 3}
