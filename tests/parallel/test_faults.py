"""Fault tolerance (issue 6): SIGKILLs at random points of a real 2-process run, corrupt and truncated
checkpoints, NaN/inf steps, a full disk while saving, and the security hygiene of loading and logging."""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from parallel.checkpoint import (CheckpointWriteError, checkpoint_step, latest_checkpoint, list_checkpoints,
                                 load_checkpoint, verify_checkpoint)
from tests.parallel import fault_workers
from tests.parallel.fault_workers import TINY, final_model, kill, launch, run_to_end
from tests.spawn import run_ranks

STEPS = 30


def _overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [*TINY, f"train.steps={STEPS}", f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> dict[str, torch.Tensor]:
    """Final parameters of an uninterrupted 2-process run."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_to_end(_overrides(run_dir, cache, "checkpoint.every=10"), run_dir / "log")
    return final_model(run_dir)


def _assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ from the uninterrupted run: {different}"


def _complete_steps(ckpt_dir: Path) -> int:
    steps = [checkpoint_step(p) for p in list_checkpoints(ckpt_dir)]
    return max(steps, default=0)


def _partial_writes(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob(".tmp-step_*")) if ckpt_dir.exists() else []


def _wait(condition, procs, timeout: float = 90.0, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs):
            raise AssertionError("the run ended before it could be killed")
        if time.monotonic() > deadline:
            raise AssertionError("the run made no progress")
        time.sleep(poll)


def test_five_random_sigkills_resume_to_the_parameters_of_an_uninterrupted_run(tmp_path, cache, reference):
    rng = random.Random(6)
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = _overrides(run_dir, cache, "checkpoint.every=1", "checkpoint.keep=2")
    # Where each kill lands: mid-step (a random delay after a checkpoint was published) or while a checkpoint
    # is being written (as soon as its temporary directory appears).
    modes = ["step", "step", "checkpoint", "checkpoint", rng.choice(["step", "checkpoint"])]
    rng.shuffle(modes)
    kills = []
    for i, mode in enumerate(modes):
        procs = launch(overrides, tmp_path / f"log{i}")
        try:
            start = _complete_steps(ckpt_dir)
            target = start + rng.randint(1, 3)
            _wait(lambda: _complete_steps(ckpt_dir) >= target, procs)
            if mode == "step":
                time.sleep(rng.uniform(0.0, 0.2))
            else:
                _wait(lambda: any(int(n.split("_")[1]) > _complete_steps(ckpt_dir)
                                  for n in _partial_writes(ckpt_dir)), procs)
        finally:
            kill(procs)
        kills.append((mode, _complete_steps(ckpt_dir), _partial_writes(ckpt_dir)))
    print("kills (where, newest complete checkpoint, partial checkpoint left):", kills)
    assert len(kills) == 5 and _complete_steps(ckpt_dir) < STEPS, kills
    assert any(partial for _, _, partial in kills), f"no kill landed while a checkpoint was being written: {kills}"

    out = run_to_end(overrides, tmp_path / "log_final")
    assert re.search(r"resumed from \S+step_\d+ at step \d+", out), out[-2000:]
    assert not list(ckpt_dir.glob(".tmp-*")) and _complete_steps(ckpt_dir) == STEPS
    _assert_same_model(reference, final_model(run_dir))


@pytest.fixture(scope="module")
def stopped_at_12(tmp_path_factory, cache) -> Path:
    """A run stopped after step 12 with checkpoints at steps 8 and 12."""
    run_dir = tmp_path_factory.mktemp("stopped")
    run_to_end(_overrides(run_dir, cache, "checkpoint.every=4", "train.stop_at=12"), run_dir / "log")
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000008", "step_00000012"]
    return run_dir


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated"])
def test_damaged_newest_checkpoint_is_detected_and_the_previous_one_resumes_to_the_same_result(
        tmp_path, cache, reference, stopped_at_12, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_12, run_dir)
    newest = run_dir / "checkpoints" / "step_00000012"
    if damage == "flipped_byte":
        victim = newest / "model-tp0-pp0.safetensors"  # the one copy of the weights (DP = 2)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    else:
        victim = newest / "optimizer-tp0-pp0.safetensors"  # the one copy of the Adam moments
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    out = run_to_end(_overrides(run_dir, cache, "checkpoint.every=4"), tmp_path / "log")
    assert f"skipping checkpoint: {victim}: sha256 mismatch (corrupt or truncated)" in out, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000008'} at step 8" in out, out[-3000:]
    _assert_same_model(reference, final_model(run_dir))


# --- NaN / inf -----------------------------------------------------------------------------------------------------

def _nested_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_nested_equal, a, b))
    if hasattr(a, "cur_scale"):  # DeepSpeed's loss scaler (no __eq__)
        return type(a) is type(b) and vars(a) == vars(b)
    return a == b


def _optimizer_state(state: dict) -> dict:
    """Optimizer + LR-schedule state without ZeRO's record of whether its last step overflowed (older, opaque
    optimizer states only: the per-parameter one has no such record)."""
    if "optimizer" not in state:
        return state
    return {**state, "optimizer": {k: v for k, v in state["optimizer"].items() if k != "overflow"}}


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_skip_drops_a_nan_step_on_one_rank_everywhere_and_training_goes_on(tmp_path, cache, zero_stage):
    from parallel.engine import safe_checkpoint_globals

    overrides = [f"run_dir={tmp_path}", f"data.cache_dir={cache}", "train.steps=5", "checkpoint.every=1",
                 "checkpoint.keep=10", "train.nonfinite=skip", f"parallel.zero_stage={zero_stage}"]
    ranks = run_ranks(2, fault_workers.nonfinite_run, overrides, 3, 1)  # NaN at step 3 on rank 1 only
    for r in ranks:
        assert r["skipped"] == [3] and r["calls"] == 5, r
        assert math.isnan(r["losses"][3]) and all(math.isfinite(r["losses"][s]) for s in (1, 2, 4, 5)), r
    ckpts = {s: [load_checkpoint(tmp_path / "checkpoints" / f"step_{s:08d}", f"tp0-pp0-dp{dp}",
                                 safe_globals=safe_checkpoint_globals()) for dp in (0, 1)] for s in (2, 3, 4)}
    for dp in (0, 1):
        before, skipped, after = ckpts[2][dp], ckpts[3][dp], ckpts[4][dp]
        # The skipped step changed nothing: weights, Adam moments and step counts, LR schedule.
        assert _nested_equal(before.model, skipped.model)
        assert _nested_equal(_optimizer_state(before.optimizer), _optimizer_state(skipped.optimizer))
        # ... while data and noise moved on, and the next step updated finite weights.
        assert not _nested_equal(before.trainer["data"], skipped.trainer["data"])
        assert not torch.equal(before.trainer["noise_rng"], skipped.trainer["noise_rng"])
        assert all(torch.isfinite(v).all() for v in after.model.values())
        assert not _nested_equal(skipped.model, after.model)
    assert _nested_equal(ckpts[4][0].model, ckpts[4][1].model)  # the data-parallel replicas agree


def test_stop_raises_naming_the_step_on_every_rank_before_any_update_or_checkpoint(tmp_path, cache):
    overrides = [f"run_dir={tmp_path}", f"data.cache_dir={cache}", "train.steps=5", "checkpoint.every=1",
                 "train.nonfinite=stop"]
    ranks = run_ranks(2, fault_workers.nonfinite_run, overrides, 3, 1)
    for r in ranks:
        assert "non-finite loss or gradient at step 3" in r["error"], r
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "step_00000002"
    verify_checkpoint(tmp_path / "checkpoints" / "step_00000002")


def _fast_cfg(tmp_path, name, *extra):
    from mdm_scale.config import load_config

    return load_config("tiny", [*TINY, f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", *extra])


def test_a_diverging_run_stops_at_the_first_nonfinite_loss_and_its_last_checkpoint_loads(dims, tmp_path):
    """No injection: a learning rate of 1e30 blows the weights up for real."""
    from mdm_scale.train import train

    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step (\d+)") as info:
        train(_fast_cfg(tmp_path, "diverge", "optimizer.lr=1e30", "optimizer.warmup_steps=1", "train.steps=10",
                        "checkpoint.every=1", "checkpoint.keep=20"))
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert bad_step >= 2
    ckpt = latest_checkpoint(tmp_path / "diverge" / "checkpoints", "tp0-pp0-dp0")
    assert ckpt.step == bad_step - 1  # nothing of the bad step was saved
    assert all(torch.isfinite(v).all() for v in ckpt.model.values())


def test_unknown_nonfinite_policy_is_a_config_error(dims, tmp_path):
    from mdm_scale.config import ConfigError
    from mdm_scale.train import train

    with pytest.raises(ConfigError, match="train.nonfinite"):
        train(_fast_cfg(tmp_path, "bad", "train.nonfinite=ignore", "train.steps=1"))


# --- Disk full -----------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted where the run's checkpoints go (needs root), unmounted afterwards."""
    mount = tmp_path / "full" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
    return filler


def test_disk_full_while_saving_keeps_old_checkpoints_continues_and_resumes_exactly(dims, tmp_path, small_disk,
                                                                                     capsys):
    from mdm_scale.train import train

    common = ["train.steps=8", "checkpoint.every=1", "checkpoint.keep=2"]
    reference = train(_fast_cfg(tmp_path, "reference", *common))

    first = train(_fast_cfg(tmp_path, "full", *common, "train.stop_at=2"))
    assert first.checkpoint.endswith("step_00000002")
    filler = _fill(small_disk)
    capsys.readouterr()
    # Steps 3-5 run on a full disk: each periodic checkpoint fails and is retried at the next step; the final
    # checkpoint (stop_at) cannot be written either, so the run stops with the error.
    with pytest.raises(CheckpointWriteError, match=r"checkpoint of step 5 not saved .*No space left on device"):
        train(_fast_cfg(tmp_path, "full", *common, "train.stop_at=5"))
    out = capsys.readouterr().out
    for step in (3, 4):
        assert re.search(rf"WARNING: checkpoint of step {step} not saved .*No space left on device.*; training "
                         rf"continues, next attempt at step {step + 1}", out), out
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "step_00000001", "step_00000002"]
    verify_checkpoint(small_disk / "step_00000002")

    filler.unlink()  # space again: the rerun resumes from step 2 and ends where the uninterrupted run ended
    resumed = train(_fast_cfg(tmp_path, "full", *common))
    assert sorted(resumed.losses) == list(range(3, 9))
    assert [resumed.losses[s] for s in range(3, 9)] == [reference.losses[s] for s in range(3, 9)]
    assert sorted(p.name for p in small_disk.iterdir()) == ["step_00000007", "step_00000008"]


# --- Security hygiene ----------------------------------------------------------------------------------------------

# Files allowed a full-pickle torch.load, with the reason.
TRUSTED_LOADS = {"tests/spawn.py": "reads back the results its own child processes just wrote"}


def test_every_torch_load_in_the_repository_is_weights_only():
    root = Path(__file__).resolve().parents[2]
    offenders, seen = [], 0
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if path == Path(__file__).resolve() or any(part.startswith(".") or part in {"runs", "build"}
                                                   for part in rel.parts):
            continue
        text = path.read_text(errors="replace")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.end(): match.end() + 400]
            depth, end = 1, 0
            for end, ch in enumerate(call):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    break
            args = call[:end]
            line = text.count("\n", 0, match.start()) + 1
            seen += 1
            if "weights_only=True" not in args and rel.as_posix() not in TRUSTED_LOADS:
                offenders.append(f"{rel}:{line}: torch.load({args})")
    assert seen >= 2  # the checkpoint loader's calls were found
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


def test_wandb_is_offline_by_default_in_every_shipped_config():
    from mdm_scale.config import CONFIG_DIR, LoggingConfig, load_config

    assert LoggingConfig().wandb_mode == "offline"
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        assert load_config(path.stem).logging.wandb_mode == "offline", path
