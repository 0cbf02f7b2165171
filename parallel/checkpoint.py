"""Atomic, checksummed, sharded checkpoints: safetensors weights + optimizer state + trainer state.

    <dir>/step_00000100/model-<place>.safetensors     the weights of one TP x PP place (no pickle), written once:
                                                      by data-parallel rank 0 of that place
                        optimizer-<place>.safetensors the optimizer moments of those weights, per parameter, under
                                                      the same global names (`exp_avg/<name>`), step counts and LR
                                                      schedule in its header; written once per place like them
                        trainer-<shard>.pt            RNG states, step, data-loader position (every rank)
                        manifest.json                 step, file names and sha256 of every file; written last

<shard> names the rank's place in the layout (e.g. tp1-pp0-dp3), <place> the same without the data-parallel
index (tp1-pp0); a single process is shard and place "rank0". So a checkpoint holds one copy of the weights per
model-parallel place whatever the data-parallel size (Megatron's and torchtitan's rule too). All ranks write into
one temporary directory and hash their own files in parallel; rank 0 gathers the digests, writes the manifest
and renames the directory into place, so a reader sees a whole checkpoint or none. `latest_checkpoint` verifies
the checksums (the files split over the ranks) and falls back to the previous checkpoint with a clear message
when the newest is truncated or corrupt. Checkpoints written before the once-per-place rule
(model-tpX-ppY-dpZ files) still load, and so do those with an opaque optimizer state (`optimizer-<place>.pt`,
or one ZeRO partition per rank `optimizer-<shard>.pt`), on the layout that wrote them.

Weights and moments do not depend on the layout, so a checkpoint resumes on another TP x PP x DP layout:
`load_checkpoint(..., reshard=RankLayout.of(model))` (parallel/consolidate.py) cuts this rank's part out of
the files of every place; a rank whose trainer file the old layout did not write takes the nearest one
(`nearest_shard`). What that makes exact and what not: docs/parallelism.md, "Checkpoints".

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
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from parallel.distributed import agree_on_error as _agree_errors
from parallel.files import fsync_dir, sha256_file

MANIFEST = "manifest.json"
PER_PARAMETER = "per_parameter"
"""Key marking an optimizer state in the layout-independent form `Engine.optimizer_state()` returns:
{"per_parameter": {key: {global name: tensor}}, "steps": {global name: step}, "lr_schedule": {...}}."""
_OPTIMIZER_HEADER = "optimizer"


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




def model_place(shard: str) -> str:
    """The model-parallel place of a shard name: tp1-pp0-dp3 -> tp1-pp0 (other names are their own place)."""
    return re.sub(r"-dp\d+$", "", shard)


def data_parallel_index(shard: str) -> int:
    match = re.search(r"-dp(\d+)$", shard)
    return int(match.group(1)) if match else 0


def nearest_shard(shard: str, saved: list[str]) -> str | None:
    """The saved shard (tpX-ppY-dpZ name) whose RNG and data state a rank of another layout resumes from: the same
    TP, PP and DP index where the saved layout has one, else 0 in that coordinate. None when nothing is saved."""
    def coords(name: str) -> tuple[int, ...] | None:
        match = re.fullmatch(r"tp(\d+)-pp(\d+)-dp(\d+)", name)
        return tuple(int(g) for g in match.groups()) if match else None

    have = {c: name for name in saved if (c := coords(name)) is not None}
    want = coords(shard)
    if not have or want is None:
        return None
    pick = tuple(w if any(c[i] == w for c in have) else 0 for i, w in enumerate(want))
    return have.get(pick, have[min(have)])


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


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
    optimizer_replicated: bool = True,
) -> Path:
    """Write this rank's part of a checkpoint; collective when several ranks exist. Returns its directory.

    Raises:
        CheckpointWriteError: on every rank, when writing failed on any rank (e.g. OSError ENOSPC); the partial
            temporary directory has been removed and the existing checkpoints are unchanged.

    Args:
        model: flat state dict of tensors (shared storage is cloned: safetensors refuses aliases).
        optimizer: optimizer / LR-scheduler state: the per-parameter form (see PER_PARAMETER; written once per
            place as safetensors, resumable on any layout), or any state dict (tensors, numbers, lists, dicts).
        trainer: RNG states, step, data position (tensors, numbers, strings).
        shard: this rank's unique name in the layout (file-name safe); "-dp<N>" at its end is the data-parallel
            index: only N = 0 writes the weights (and a replicated optimizer state).
        optimizer_replicated: for a state dict that is not per-parameter: every data-parallel rank holds the same
            one (no ZeRO partitioning).
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
    first_replica = data_parallel_index(shard) == 0
    place = model_place(shard)
    writes = {}  # largest first: a full disk then fails in safetensors' write, which reports ENOSPC as such
    if first_replica:
        writes[f"model-{place}.safetensors"] = lambda path: save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in model.items()}, path, metadata=metadata)
    if PER_PARAMETER in optimizer:  # layout-independent: once per place, like the weights
        if first_replica:
            writes[f"optimizer-{place}.safetensors"] = lambda path: _save_per_parameter(optimizer, path, metadata)
    elif first_replica or not optimizer_replicated:
        writes[f"optimizer-{place if optimizer_replicated else shard}.pt"] = lambda path: torch.save(optimizer, path)
    writes[f"trainer-{shard}.pt"] = lambda path: torch.save(trainer, path)
    digests: dict[str, str] = {}
    try:
        for name, write in writes.items():
            write(tmp / name)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            digests[name] = sha256_file(tmp / name)  # each rank hashes what it wrote: in parallel
    except Exception as e:  # noqa: BLE001 - disk full surfaces as OSError, RuntimeError or SafetensorError
        error = f"writing shard '{shard}' failed: {type(e).__name__}: {e}"
    if error := _agree_errors(error):
        _failed(step, tmp, error)
    gathered = [digests]
    if _world() > 1:
        gathered = [None] * _world()
        dist.all_gather_object(gathered, digests)
    if _rank() == 0:
        try:
            names = sorted(p.name for p in tmp.iterdir())
            hashes = {k: v for d in gathered for k, v in d.items()}
            manifest = {"step": step, "sha256": {name: hashes.get(name) or sha256_file(tmp / name) for name in names}}
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
        older = [p for p in list_checkpoints(root) if checkpoint_step(p) < step]
        for old in older[:len(older) - (keep - 1)] if keep > 0 else []:
            try:
                _remove(old)
            except OSError as e:
                warnings.warn(f"could not delete old checkpoint {old}: {e}", stacklevel=2)
    _barrier()
    return final


def _save_per_parameter(optimizer: dict[str, Any], path: Path, metadata: dict[str, str] | None) -> None:
    """Moments as `<key>/<global name>` tensors; steps and LR schedule as JSON in the header (with the weights'
    TP partition dims, which the moments share)."""
    tensors = {f"{key}/{name}": t.detach().cpu().contiguous().clone()
               for key, by_name in optimizer[PER_PARAMETER].items() for name, t in by_name.items()}
    header = {k: v for k, v in optimizer.items() if k != PER_PARAMETER}
    save_file(tensors, path, metadata={**(metadata or {}), _OPTIMIZER_HEADER: json.dumps(header)})


def _per_parameter(tensors: dict[str, torch.Tensor], headers: list[dict]) -> dict[str, Any]:
    """The per-parameter optimizer state from `<key>/<name>` tensors and the JSON headers of the files read."""
    state: dict[str, Any] = {}
    for header in headers:  # every place records the same LR schedule; steps are per parameter
        steps = {**state.get("steps", {}), **header.get("steps", {})}
        state.update(header, steps=steps)
    state[PER_PARAMETER] = {}
    for name, tensor in tensors.items():
        key, _, global_name = name.partition("/")
        state[PER_PARAMETER].setdefault(key, {})[global_name] = tensor
    return state


def _headers(path: Path, names: list[str]) -> list[dict]:
    headers = []
    for name in names:
        with safe_open(str(path / name), framework="pt") as f:
            headers.append(json.loads((f.metadata() or {}).get(_OPTIMIZER_HEADER, "{}")))
    return headers


def _failed(step: int, tmp: Path, error: str):
    """Every rank: remove the partial checkpoint (rank 0) and raise the agreed error."""
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    raise CheckpointWriteError(f"checkpoint of step {step} not saved ({error}); partial files removed, "
                               f"earlier checkpoints are intact")


def checkpoint_step(path: str | os.PathLike) -> int:
    """The training step a checkpoint directory (`step_<NNNNNNNN>`) holds."""
    return int(Path(path).name.split("_")[1])


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories with a manifest, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.exists():
        return []
    dirs = [p for p in root.glob("step_*") if (p / MANIFEST).exists()]
    return sorted(dirs, key=checkpoint_step)


def damaged_checkpoints(root: str | os.PathLike) -> list[Path]:
    """`step_*` directories without a manifest. Publishing is an atomic rename of a directory whose manifest was
    written last, so these are damage (a manifest deleted or lost by the filesystem), never a save in progress."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not (p / MANIFEST).exists()) if root.exists() else []


def verify_checkpoint(path: str | os.PathLike, part: tuple[int, int] = (0, 1)) -> dict:
    """Check the files of a checkpoint against its manifest; returns the manifest or raises CheckpointError.

    Args:
        part: (k, n): check only every n-th file from the k-th (sorted by name), so n ranks share the hashing.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    for name, digest in sorted(manifest["sha256"].items())[part[0]::part[1]]:
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file}: sha256 mismatch (corrupt or truncated)")
    return manifest


def load_checkpoint(path: str | os.PathLike, shard: str = "rank0", *, verify: bool = True,
                    safe_globals: list | None = None, reshard=None) -> Checkpoint:
    """Load one rank's shard, verifying the whole checkpoint first. Raises CheckpointError naming a bad file.

    Args:
        safe_globals: extra classes `torch.load(weights_only=True)` may build (e.g. DeepSpeed's loss scaler).
        reshard: this rank's `parallel.consolidate.RankLayout`: its weights and per-parameter optimizer moments
            are cut from the files of any TP x PP layout, and a shard the saving layout did not have takes the
            trainer state of `nearest_shard`. Without it the checkpoint must come from this very layout.
    """
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST).read_text())
    files = manifest["sha256"]

    place = model_place(shard)

    def find(kind: str, *names: str) -> Path:
        for name in names:
            if name in files:
                return path / name
        raise CheckpointError(f"{path}: no {kind} file for shard '{shard}' (saved with another parallel layout?); "
                              f"files: {', '.join(sorted(files))}")

    # The weights: the place's one copy (or, in checkpoints from before that rule, data-parallel rank 0's); the
    # optimizer: per-parameter moments of the place, or (older checkpoints) this rank's ZeRO partition or the
    # place's replicated copy; the trainer state: this rank's own (or, on another layout, the nearest rank's).
    per_parameter = sorted(n for n in files if n.startswith("optimizer-") and n.endswith(".safetensors"))
    if reshard is not None:
        model = reshard.read(path, "model")
        if not per_parameter and not any(n in files for n in (f"optimizer-{shard}.pt", f"optimizer-{place}.pt")):
            raise CheckpointError(f"{path} holds its optimizer state per rank of the layout that wrote it (a "
                                  f"checkpoint from before per-parameter optimizer state): resume it on that "
                                  f"layout once; its next checkpoint can move to another")
    else:
        model = load_file(find("model", f"model-{place}.safetensors", f"model-{shard}.safetensors",
                               f"model-{place}-dp0.safetensors"))
    with torch.serialization.safe_globals(safe_globals or []):
        if per_parameter and reshard is not None:
            optimizer = _per_parameter(reshard.read(path, "optimizer"), _headers(path, per_parameter))
        elif per_parameter:
            own = find("optimizer", f"optimizer-{place}.safetensors")
            optimizer = _per_parameter(load_file(own), _headers(path, [own.name]))
        else:
            optimizer = torch.load(find("optimizer", f"optimizer-{shard}.pt", f"optimizer-{place}.pt"),
                                   weights_only=True)
        trainer_name = f"trainer-{shard}.pt"
        if trainer_name not in files and reshard is not None:
            saved = [n[len("trainer-"):-len(".pt")] for n in files if n.startswith("trainer-")]
            trainer_name = f"trainer-{nearest_shard(shard, saved)}.pt"
        trainer = torch.load(find("trainer", trainer_name), weights_only=True)
    return Checkpoint(step=int(manifest["step"]), model=model, optimizer=optimizer, trainer=trainer, path=path)


def latest_checkpoint(root: str | os.PathLike, shard: str = "rank0", *, safe_globals: list | None = None,
                      reshard=None) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt newer ones and directories without a manifest are reported
    (a warning each) and skipped. None when `root` holds no checkpoint at all.

    Raises:
        CheckpointError: when checkpoints exist but none verifies: starting over would silently drop the run's
            work, so the caller must decide (move them away, or restore them).

    Collective: rank 0 verifies and every rank loads the checkpoint rank 0 chose (`reshard`: see load_checkpoint)."""
    candidates = [str(p) for p in reversed(list_checkpoints(root))]
    rejected = [f"{p}: no manifest (incomplete or damaged)" for p in damaged_checkpoints(root)]
    if _world() > 1:  # every rank walks rank 0's list
        shared = [candidates, rejected]
        dist.broadcast_object_list(shared, src=0)
        candidates, rejected = shared
    if _rank() == 0:
        for reason in rejected:
            warnings.warn(f"skipping checkpoint {reason}", stacklevel=2)
    chosen = None
    for path in candidates:  # the files of each candidate are hashed by all ranks together
        error = None
        try:
            verify_checkpoint(path, part=(_rank(), _world()))
        except CheckpointError as e:
            error = str(e)
        if error := _agree_errors(error, name_rank=False):  # the message names the file
            rejected.append(error)
            if _rank() == 0:
                warnings.warn(f"skipping checkpoint: {error}; trying the previous one", stacklevel=2)
            continue
        chosen = path
        break
    if chosen is None and rejected:
        raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(rejected)}. Refusing to start over from "
                              f"step 0 over them: move the directory away to start a new run, or restore the files")
    if chosen is None:
        return None
    return load_checkpoint(chosen, shard, verify=False, safe_globals=safe_globals, reshard=reshard)
