"""Checkpoints: atomic, checksummed, safe to load, and a corrupt newest one falls back to the previous."""

from __future__ import annotations

import pytest
import torch

from parallel.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _save(root, step, keep=3):
    return save_checkpoint(root, step, model={"w": torch.full((4,), float(step))},
                           optimizer={"state": {0: {"exp_avg": torch.ones(4)}}, "lr": 1e-3},
                           trainer={"step": step, "rng": torch.get_rng_state()}, keep=keep)


def test_save_load_restores_state(tmp_path):
    _save(tmp_path, 5)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 5 and torch.equal(ckpt.model["w"], torch.full((4,), 5.0))
    assert ckpt.optimizer["lr"] == 1e-3 and ckpt.trainer["step"] == 5


def test_keep_prunes_old_checkpoints_and_ignores_partial_writes(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    (tmp_path / ".tmp-step_00000005").mkdir()  # a writer killed mid-save
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_flipped_byte_is_detected_and_previous_checkpoint_used(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    data = bytearray((newest / "model-rank0.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "model-rank0.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_checkpoint(tmp_path).step == 1


def test_pickled_code_is_refused(tmp_path):
    path = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "trainer-rank0.pt")
    import hashlib, json  # noqa: E401

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["sha256"]["trainer-rank0.pt"] = hashlib.sha256((path / "trainer-rank0.pt").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(path)


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """A directory already holding a higher step (an earlier, longer run): saving step 5 with keep=1 must keep
    step 5 (on the old rule, keep the highest steps, it deleted the checkpoint it had just written)."""
    _save(tmp_path, 10, keep=1)
    _save(tmp_path, 3, keep=1)
    written = _save(tmp_path, 5, keep=1)
    assert written.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005", "step_00000010"]  # 3 was older


def test_every_checkpoint_corrupt_refuses_to_start_over(tmp_path):
    for step in (1, 2):
        path = _save(tmp_path, step)
        (path / "trainer-rank0.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        with pytest.raises(CheckpointError, match="no usable checkpoint.*Refusing to start over"):
            latest_checkpoint(tmp_path)


def test_checkpoint_without_manifest_is_reported(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="step_00000002: no manifest"):
        assert latest_checkpoint(tmp_path).step == 1
    (tmp_path / "step_00000001" / "manifest.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_checkpoint(tmp_path)


def test_empty_directory_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "missing") is None


def test_checkpoints_of_the_previous_format_still_load(tmp_path):
    """Before one copy per place, every rank wrote model-/optimizer-tpX-ppY-dpZ; runs resume across the change."""
    path = save_checkpoint(tmp_path, 3, model={"w": torch.ones(2)}, optimizer={"lr": 1.0}, trainer={"step": 3},
                           shard="tp0-pp0-dp0")
    manifest = (path / "manifest.json").read_text()
    for kind, suffix in (("model", ".safetensors"), ("optimizer", ".pt")):
        (path / f"{kind}-tp0-pp0{suffix}").rename(path / f"{kind}-tp0-pp0-dp0{suffix}")
        manifest = manifest.replace(f'"{kind}-tp0-pp0{suffix}"', f'"{kind}-tp0-pp0-dp0{suffix}"')
    (path / "manifest.json").write_text(manifest)
    ckpt = load_checkpoint(path, "tp0-pp0-dp0")
    assert torch.equal(ckpt.model["w"], torch.ones(2)) and ckpt.optimizer["lr"] == 1.0
    with pytest.raises(CheckpointError, match="no (optimizer|trainer) file for shard 'tp0-pp0-dp1'"):
        load_checkpoint(path, "tp0-pp0-dp1")  # never another rank's RNG and data position
