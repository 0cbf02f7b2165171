"""Atomic, checksummed checkpoints: safetensors weights + optimizer state + trainer state (RNG, step, data).

    <dir>/step_00000100/model.safetensors    weights (safe to load anywhere, no pickle)
                        optimizer.pt         optimizer + LR-scheduler state (loaded with weights_only=True)
                        trainer.pt           RNG states, step, data-loader position (weights_only=True)
                        manifest.json        step and sha256 of every file; written last

A checkpoint is written under a temporary name and renamed into place, so a reader sees a whole one or none.
`latest_checkpoint` verifies checksums and falls back to the previous checkpoint with a clear message when the
newest is truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing files or fails its checksums."""


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    path: Path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    trainer: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and delete all but the `keep` newest. Returns its directory.

    Args:
        model: flat state dict of tensors (shared storage is cloned: safetensors refuses aliases).
        optimizer: optimizer / LR-scheduler state (tensors, numbers, lists, dicts).
        trainer: RNG states, step, data position (tensors, numbers, strings).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.items()}, tmp / "model.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(trainer, tmp / "trainer.pt")
        files = {name: _sha256(tmp / name) for name in ("model.safetensors", "optimizer.pt", "trainer.pt")}
        with open(tmp / MANIFEST, "w") as f:
            json.dump({"step": step, "sha256": files}, f, indent=1)
        for name in (*files, MANIFEST):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories with a manifest, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.exists():
        return []
    dirs = [p for p in root.glob("step_*") if (p / MANIFEST).exists()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load one checkpoint, verifying every checksum first. Raises CheckpointError naming the bad file."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    for name, digest in manifest["sha256"].items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: sha256 mismatch (corrupt or truncated)")
    return Checkpoint(
        step=int(manifest["step"]),
        model=load_file(path / "model.safetensors"),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        trainer=torch.load(path / "trainer.pt", weights_only=True),
        path=path,
    )


def latest_checkpoint(root: str | os.PathLike) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}; trying the previous one", stacklevel=2)
    return None
