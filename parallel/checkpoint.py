"""Atomic, checksummed, sharded checkpoints: safetensors weights + optimizer state + trainer state per rank.

    <dir>/step_00000100/model-<shard>.safetensors   this rank's weights (TP/PP shard; no pickle)
                        optimizer-<shard>.pt        optimizer (ZeRO partition) + LR state, weights_only=True
                        trainer-<shard>.pt          RNG states, step, data-loader position, weights_only=True
                        manifest.json               step, shard names and sha256 of every file; written last

<shard> names the rank's place in the layout (e.g. tp1-pp0-dp0); a single process has one shard. All ranks write
into one temporary directory; after a barrier rank 0 checksums everything, writes the manifest and renames the
directory into place, so a reader sees a whole checkpoint or none. `latest_checkpoint` verifies the checksums
and falls back to the previous checkpoint with a clear message when the newest is truncated or corrupt.

A process killed at any point (SIGKILL, node loss) leaves at most a `.tmp-*` directory, which readers ignore and
the next save removes. A save that fails (disk full, quota, I/O error on any rank) removes its temporary
directory, leaves the previous checkpoints untouched and raises `CheckpointWriteError` on every rank alike; the
training loop (mdm_scale/train.py) reports it and carries on to retry at the next checkpoint, except for the
final checkpoint of a run, whose failure stops the run with that error. (Megatron and torchtitan let any failed
save crash the job; a requeued job on a still-full disk then fails the same way and the steps since the last
checkpoint are lost. Carrying on keeps that work while someone frees space; a job never ends without its last
state on disk.)
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from parallel.distributed import agree_on_error as _agree_errors
from parallel.files import fsync_dir, sha256_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing files or fails its checksums."""


class CheckpointWriteError(CheckpointError):
    """Saving a checkpoint failed on some rank (e.g. disk full); nothing was published, older ones are intact."""


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    path: Path




def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _remove(path: Path) -> None:
    """Take a directory out of view atomically (rename to a `.tmp-` name), then delete it."""
    if not path.exists():
        return
    doomed = path.with_name(f".tmp-delete-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    trainer: dict[str, Any],
    shard: str = "rank0",
    keep: int = 2,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write this rank's part of a checkpoint; collective when several ranks exist. Returns its directory.

    Raises:
        CheckpointWriteError: on every rank, when writing failed on any rank (e.g. OSError ENOSPC); the partial
            temporary directory has been removed and the existing checkpoints are unchanged.

    Args:
        model: flat state dict of tensors (shared storage is cloned: safetensors refuses aliases).
        optimizer: optimizer / LR-scheduler state (tensors, numbers, lists, dicts).
        trainer: RNG states, step, data position (tensors, numbers, strings).
        shard: this rank's unique name in the layout (file-name safe).
        keep: complete checkpoints kept: this one and the keep - 1 newest older ones; checkpoints of higher steps
            are never deleted here (rank 0 deletes; 0 keeps everything).
        metadata: strings stored in the safetensors header (e.g. TP partition dims, see consolidate.py).
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    error = None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # left by a process killed while saving or deleting
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"cannot create {tmp}: {e}"
    if error := _agree_errors(error):
        _failed(step, tmp, error)
    files = [f"model-{shard}.safetensors", f"optimizer-{shard}.pt", f"trainer-{shard}.pt"]
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.items()}, tmp / files[0],
                  metadata=metadata)
        torch.save(optimizer, tmp / files[1])
        torch.save(trainer, tmp / files[2])
        for name in files:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
    except Exception as e:  # noqa: BLE001 - disk full surfaces as OSError, RuntimeError or SafetensorError
        error = f"writing shard '{shard}' failed: {type(e).__name__}: {e}"
    if error := _agree_errors(error):
        _failed(step, tmp, error)
    if _rank() == 0:
        try:
            names = sorted(p.name for p in tmp.iterdir())
            manifest = {"step": step, "sha256": {name: sha256_file(tmp / name) for name in names}}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            replaced = final.with_name(f".tmp-replaced-{final.name}")
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(replaced, ignore_errors=True)
                os.rename(final, replaced)
            os.rename(tmp, final)
            fsync_dir(root)
            shutil.rmtree(replaced, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            error = f"publishing {final} failed: {type(e).__name__}: {e}"
    if error := _agree_errors(error):
        _failed(step, tmp, error)
    if _rank() == 0:
        older = [p for p in list_checkpoints(root) if _step_of(p) < step]
        for old in older[:len(older) - (keep - 1)] if keep > 0 else []:
            try:
                _remove(old)
            except OSError as e:
                warnings.warn(f"could not delete old checkpoint {old}: {e}", stacklevel=2)
    _barrier()
    return final


def _failed(step: int, tmp: Path, error: str):
    """Every rank: remove the partial checkpoint (rank 0) and raise the agreed error."""
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    raise CheckpointWriteError(f"checkpoint of step {step} not saved ({error}); partial files removed, "
                               f"earlier checkpoints are intact")


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories with a manifest, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.exists():
        return []
    dirs = [p for p in root.glob("step_*") if (p / MANIFEST).exists()]
    return sorted(dirs, key=_step_of)


def damaged_checkpoints(root: str | os.PathLike) -> list[Path]:
    """`step_*` directories without a manifest. Publishing is an atomic rename of a directory whose manifest was
    written last, so these are damage (a manifest deleted or lost by the filesystem), never a save in progress."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not (p / MANIFEST).exists()) if root.exists() else []


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file of a checkpoint against its manifest; returns the manifest or raises CheckpointError."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    for name, digest in manifest["sha256"].items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file}: sha256 mismatch (corrupt or truncated)")
    return manifest


def load_checkpoint(path: str | os.PathLike, shard: str = "rank0", *, verify: bool = True,
                    safe_globals: list | None = None) -> Checkpoint:
    """Load one rank's shard, verifying the whole checkpoint first. Raises CheckpointError naming a bad file.

    Args:
        safe_globals: extra classes `torch.load(weights_only=True)` may build (e.g. DeepSpeed's loss scaler).
    """
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST).read_text())
    if f"model-{shard}.safetensors" not in manifest["sha256"]:
        raise CheckpointError(f"{path}: no shard '{shard}' (saved with another parallel layout?); "
                              f"files: {', '.join(sorted(manifest['sha256']))}")
    with torch.serialization.safe_globals(safe_globals or []):
        optimizer = torch.load(path / f"optimizer-{shard}.pt", weights_only=True)
        trainer = torch.load(path / f"trainer-{shard}.pt", weights_only=True)
    return Checkpoint(step=int(manifest["step"]), model=load_file(path / f"model-{shard}.safetensors"),
                      optimizer=optimizer, trainer=trainer, path=path)


def latest_checkpoint(root: str | os.PathLike, shard: str = "rank0", *, safe_globals: list | None = None
                      ) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt newer ones and directories without a manifest are reported
    (a warning each) and skipped. None when `root` holds no checkpoint at all.

    Raises:
        CheckpointError: when checkpoints exist but none verifies: starting over would silently drop the run's
            work, so the caller must decide (move them away, or restore them).

    Collective: rank 0 verifies and every rank loads the checkpoint rank 0 chose."""
    chosen, error = [None], None
    if _rank() == 0:
        rejected = [f"{p}: no manifest (incomplete or damaged)" for p in damaged_checkpoints(root)]
        for reason in rejected:
            warnings.warn(f"skipping checkpoint {reason}", stacklevel=2)
        for path in reversed(list_checkpoints(root)):
            try:
                verify_checkpoint(path)
                chosen = [str(path)]
                break
            except CheckpointError as e:
                rejected.append(str(e))
                warnings.warn(f"skipping checkpoint: {e}; trying the previous one", stacklevel=2)
        if chosen[0] is None and rejected:
            error = (f"no usable checkpoint in {root}: {'; '.join(rejected)}. Refusing to start over from step 0 "
                     f"over them: move the directory away to start a new run, or restore the files")
    if error := _agree_errors(error):
        raise CheckpointError(error)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None
    return load_checkpoint(chosen[0], shard, verify=False, safe_globals=safe_globals)
