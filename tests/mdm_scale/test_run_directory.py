"""A run directory belongs to one run: a changed config is refused (or, for safe keys and on request, applied and
recorded), the directory is locked while a run uses it, and checkpoints are never silently dropped."""

from __future__ import annotations

import json

import pytest
import torch

from mdm_scale.config import load_config
from mdm_scale.metrics import read_metrics
from mdm_scale.run_directory import HISTORY_FILE, RunDirError, config_changes
from mdm_scale.train import train, warmup_cosine
from parallel.checkpoint import CheckpointError
from parallel.run_lock import RunLock

FAST = [
    "data.source=committed", "data.tokenizer=byte", "data.seq_len=16", "data.micro_batch_size=4",
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
    "logging.wandb=false", "logging.progress=false", "logging.log_every=1", "train.eval_batches=1",
    "train.eval_every=0", "sampling.num_samples=0", "train.steps=4", "optimizer.warmup_steps=2",
]


def _cfg(tmp_path, *extra):
    return load_config("tiny", [*FAST, f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *extra])


def test_changed_objective_is_refused_and_config_yaml_kept(dims, tmp_path):
    train(_cfg(tmp_path, "train.stop_at=2"))
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(RunDirError, match=r"belongs to another run: objective\.causal False -> True, objective\.schedule\.kind 'loglinear' -> "
                                          r"'left_to_right'.*use a new run_dir"):
        train(_cfg(tmp_path, "objective=ar"))
    with pytest.raises(RunDirError, match=r"model\.hidden_size 32 -> 64"):
        train(_cfg(tmp_path, "model.hidden_size=64", "train.allow_config_change=true"))  # never safe
    assert (tmp_path / "run" / "config.yaml").read_text() == recorded


def test_safe_change_needs_the_flag_and_is_recorded_in_the_history(dims, tmp_path):
    train(_cfg(tmp_path, "train.stop_at=2"))
    with pytest.raises(RunDirError, match=r"train\.steps 4 -> 6.*train\.allow_config_change=true"):
        train(_cfg(tmp_path, "train.steps=6"))
    # Recomputation replays the same numbers (test_recompute.py): it may change freely, without the flag.
    result = train(_cfg(tmp_path, "train.steps=6", "train.allow_config_change=true", "model.recompute=full"))
    assert result.step == 6 and sorted(result.losses) == [3, 4, 5, 6]
    history = [json.loads(line) for line in (tmp_path / "run" / HISTORY_FILE).read_text().splitlines()]
    assert history[-1]["changes"]["train.steps"] == [4, 6]
    assert "steps: 4" in (tmp_path / "run" / "config.yaml").read_text()  # the original stays


def test_new_learning_rate_on_resume_is_applied(dims, tmp_path):
    """The optimizer state saved at step 2 carries lr 1e-3; the resumed run's config says 4e-3 and must win."""
    train(_cfg(tmp_path, "optimizer.lr=1e-3", "train.stop_at=2"))
    train(_cfg(tmp_path, "optimizer.lr=4e-3", "train.allow_config_change=true"))
    lrs = {row["step"]: row["train/lr"] for row in read_metrics(tmp_path / "run") if "train/lr" in row}
    for step in (3, 4):  # lr logged after the step's update: the multiplier of the next step
        assert lrs[step] == pytest.approx(4e-3 * warmup_cosine(step, warmup=2, total=4, min_ratio=0.1)), lrs


def test_run_directory_in_use_is_refused(dims, tmp_path):
    with RunLock(tmp_path / "run"):  # another live run (this process's pid) holds it
        with pytest.raises(RunDirError, match="in use by another run"):
            train(_cfg(tmp_path))
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written
    train(_cfg(tmp_path))
    assert not (tmp_path / "run" / ".lock").exists()  # released at the end


def test_resume_false_over_existing_checkpoints_is_refused(dims, tmp_path):
    train(_cfg(tmp_path, "train.stop_at=2"))
    with pytest.raises(RunDirError, match="already holds checkpoints.*checkpoint.resume=false"):
        train(_cfg(tmp_path, "checkpoint.resume=false"))


def test_checkpoint_that_does_not_fit_the_model_is_one_clear_error(dims, tmp_path):
    """config.yaml edited by hand (so the identity check passes) to another width: resume says which checkpoint
    does not fit instead of a shape traceback from load_state_dict."""
    train(_cfg(tmp_path, "train.stop_at=2"))
    path = tmp_path / "run" / "config.yaml"
    path.write_text(path.read_text().replace("hidden_size: 32", "hidden_size: 64"))
    with pytest.raises(CheckpointError, match="step_00000002 does not fit this model"):
        train(_cfg(tmp_path, "model.hidden_size=64"))


def test_config_changes_lists_leaves():
    a, b = load_config("tiny"), load_config("tiny", ["optimizer.betas=[0.8,0.9]", "objective=ar"])
    changes = config_changes(a, b)
    assert changes["optimizer.betas"] == ([0.9, 0.999], [0.8, 0.9])
    assert changes["objective.schedule.kind"] == ("loglinear", "left_to_right")
    assert config_changes(a, load_config("tiny")) == {}


def test_lock_is_released_when_training_fails(dims, tmp_path):
    with pytest.raises(FloatingPointError):
        train(_cfg(tmp_path, "optimizer.lr=1e30", "optimizer.warmup_steps=0", "optimizer.grad_clip=0"))
    assert not (tmp_path / "run" / ".lock").exists()
    torch.manual_seed(0)


def test_a_new_parallel_layout_needs_the_flag_and_is_recorded(tmp_path):
    """Checkpoints reshard (tests/parallel/test_reshard.py), so a run may move to another layout or micro-batch
    split, but only on purpose: without train.allow_config_change the start is refused, naming the keys."""
    from mdm_scale.run_directory import check_run_directory

    check_run_directory(_cfg(tmp_path))
    moved = ["parallel.tensor_parallel=2", "parallel.zero_stage=1", "data.micro_batch_size=2"]
    with pytest.raises(RunDirError, match=r"parallel\.tensor_parallel 1 -> 2.*train\.allow_config_change=true"):
        check_run_directory(_cfg(tmp_path, *moved))
    changes = check_run_directory(_cfg(tmp_path, *moved, "train.allow_config_change=true"))
    assert {"parallel.tensor_parallel", "parallel.zero_stage", "data.micro_batch_size"} <= set(changes)
    history = [json.loads(line) for line in (tmp_path / "run" / HISTORY_FILE).read_text().splitlines()]
    assert history[-1]["changes"]["parallel.tensor_parallel"] == [1, 2]
