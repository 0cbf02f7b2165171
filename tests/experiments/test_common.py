"""experiments/common.py: datasets written as byte-tokenizer MDS shards read back by the trainer's reader, option
overrides, order statistics and seed comparisons, and one tiny training run end to end."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import common  # noqa: E402


def test_write_token_dataset_round_trips_through_the_trainer_reader(tmp_path):
    from data_pipeline.datasets import open_split
    from data_pipeline.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    x = {"train": rng.integers(0, 16, (64, 8)), "heldout": rng.integers(0, 16, (16, 8))}
    info = common.write_token_dataset(tmp_path / "d", x, offset=ord("a"))
    assert info["train"]["num_sequences"] == 64 and info["heldout"]["seq_len"] == 8
    batches = open_split(tmp_path / "d", "heldout", load_tokenizer("byte"), seq_len=8, batch_size=16, seed=0,
                         rank=0, world_size=1, num_workers=0)
    got = next(iter(batches)).numpy()
    assert sorted(map(tuple, got - ord("a"))) == sorted(map(tuple, x["heldout"]))
    with pytest.raises(ValueError):
        common.write_token_dataset(tmp_path / "e", {"train": np.full((2, 4), 300)})


def test_override_settings_sets_only_given_options_in_order():
    s = common.TrainSettings()
    args = argparse.Namespace(steps=50, batch=None, lr=1e-3)
    assert common.override_settings(s, args, ("steps", "batch", "lr")) == ["steps", "lr"]
    assert (s.steps, s.batch, s.lr) == (50, 32, 1e-3)
    with pytest.raises(AttributeError):
        common.override_settings(s, argparse.Namespace(nope=1), ("nope",))


def test_statistics():
    assert common.spearman([0, 1, 2, 3], [1.0, 2.0, 5.0, 9.0]) == pytest.approx(1.0)
    assert common.spearman([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert common.spearman([0, 1, 2], [1.0, 1.0, 1.0]) == 0.0
    assert list(common.rank([3.0, 1.0, 1.0])) == [2.0, 0.5, 0.5]
    stats = common.generation_order_stats(np.array([0.3, 0.8, 1.5, 4.0]), samples=4000)
    assert stats["p_right_neighbour_first"] > 0.6 and np.all(np.diff(stats["mean_generation_step"]) < 0)
    flat = common.generation_order_stats(np.ones(4), samples=4000)
    assert abs(flat["p_right_neighbour_first"] - 0.5) < 0.03
    ms = common.mean_std([1.0, 2.0, 3.0])
    assert ms["mean"] == 2.0 and ms["std"] == pytest.approx(1.0) and common.mean_std([5.0])["std"] == 0.0
    c = common.compare_to_baseline([1.0, 1.1, 1.2], [0.5, 0.6, 0.7])
    assert c["margin"] == pytest.approx(0.5) and c["beats_beyond_noise"] and c["paired_differences"] == \
        pytest.approx([0.5, 0.5, 0.5])
    assert not common.compare_to_baseline([1.0, 1.1, 1.2], [1.05, 0.95, 1.3])["beats_beyond_noise"]


def test_train_run_collects_the_nelbo_curve_and_learned_exponents(tmp_path):
    common.limit_threads(1)
    rng = np.random.default_rng(0)
    common.write_token_dataset(tmp_path / "d", {"train": rng.integers(0, 8, (64, 8)),
                                                "heldout": rng.integers(0, 8, (16, 8))}, offset=ord("a"))
    s = common.TrainSettings(seq_len=8, steps=4, eval_every=2, layers=1, hidden=32, heads=2, batch=8, warmup=1,
                             eval_batches=2, eval_time_samples=1, schedule_lr_mult=10.0)
    cfg = common.run_config(["objective=mdm_ls"], data_dir=tmp_path / "d", run_dir=tmp_path / "run", name="t",
                            seed=0, s=s)
    result = common.train_run(cfg)
    assert [step for step, _ in result["curve"]] == [0, 2, 4]
    assert result["final_nelbo"] == result["curve"][-1][1] and math.isfinite(result["final_nelbo"])
    assert len(result["losses"]) == 4 and result["wall_s"] > 0
    w = common.learned_exponents(cfg, tmp_path / "run" / "checkpoints")
    assert w.shape == (8,) and np.all((w >= 0.25) & (w <= 1.75)) and np.ptp(w) > 0  # x10 lr moved them
    x = rng.integers(0, 8, (3, 8)) + ord("a")
    assert common.learned_exponents(cfg, tmp_path / "run" / "checkpoints", x, per_sample=True).shape == (3, 8)


@pytest.mark.parametrize("control", sorted(common.CONTROL_OVERRIDES))
def test_controls_are_valid_configs_of_uniform_orders(control, tmp_path):
    """Each control keeps MDLM's uniform order (w = 1 everywhere, nothing learned) and changes only the estimator
    or time sampler, which is what makes it a control for the learned presets."""
    cfg = common.run_config(common.CONTROL_OVERRIDES[control], data_dir=tmp_path, run_dir=tmp_path / "run",
                            name=control, seed=0, s=common.TrainSettings())
    o = cfg.objective
    assert o.t_min == 0.0 and o.schedule.kind in ("loglinear", "polynomial")
    assert o.schedule.kind == "loglinear" or o.schedule.exponent == 1.0
    assert (o.estimator == "order") == (control == "mdlm_order")
    assert (o.time_power == 0.2) == (control == "mdlm_is")
