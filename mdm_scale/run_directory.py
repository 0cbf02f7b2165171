"""A run directory belongs to one run: its lock, the config that created it, and the changes made on resume.

    with claim_run_directory(cfg, is_main=dims.is_main):   # every rank; rank 0 locks and checks
        ...                                                # train

`<run_dir>/config.yaml` is written once, by the run that creates the directory, and is what evaluation, sampling
and export read. A later start in the same directory compares its config with it, key by key:
- keys that do not change what is trained (logging, evaluation cadence, checkpoint cadence, sampling, data
  workers, device, kernels, activation recomputation, stop_at) may differ freely;
- SAFE_KEYS (more steps, optimizer settings, precision, the parallel layout and the micro-batch split: checkpoints
  reshard, docs/parallelism.md) may differ with `train.allow_config_change=true`; the new values are applied (the
  optimizer's saved hyper-parameters do not override them);
- anything else (model, objective, data, seed, parallel layout...) is refused: that is another run.
Every accepted difference is appended to `<run_dir>/config_history.jsonl`; config.yaml keeps the original.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mdm_scale.config import ConfigError, RunConfig, load_config, to_yaml
from parallel.checkpoint import damaged_checkpoints, list_checkpoints
from parallel.distributed import agree_on_error
from parallel.files import atomic_write
from parallel.run_lock import RunLock, RunLockError

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"

FREE_KEYS = ("name", "run_dir", "kernels", "model.recompute", "logging.", "data.num_workers", "data.cache_dir", "train.stop_at",
             "train.eval_every", "train.eval_batches", "train.eval_time_samples", "train.device",
             "train.allow_config_change", "checkpoint.", "sampling.")
"""Keys (or prefixes ending in '.') that do not change the trained weights."""
SAFE_KEYS = ("train.steps", "train.precision", "train.nonfinite", "optimizer.", "parallel.", "data.micro_batch_size",
             "data.grad_accumulation")
"""Keys that change the rest of the run but not its past: accepted with train.allow_config_change=true."""


class RunDirError(RuntimeError):
    """The run directory belongs to another run, is in use, or cannot be checked."""


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def config_changes(recorded: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (recorded value, new value)} for every leaf that differs."""
    old, cur = _flatten(asdict(recorded)), _flatten(asdict(new))
    return {k: (old.get(k), cur.get(k)) for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)}


def _describe(changes: dict[str, tuple[Any, Any]], keys: list[str], limit: int = 6) -> str:
    text = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_run_directory(cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Record or check the run directory's identity (see the module docstring); returns the accepted changes.

    Raises:
        RunDirError: with one line naming the differing keys and the ways out.
    """
    run_dir = Path(cfg.run_dir)
    checkpoints = list_checkpoints(run_dir / "checkpoints") + damaged_checkpoints(run_dir / "checkpoints")
    if checkpoints and not cfg.checkpoint.resume:
        raise RunDirError(f"{run_dir} already holds checkpoints ({checkpoints[-1].name}) and checkpoint.resume=false "
                          f"would start another run over them; use a new run_dir, or remove {run_dir}")
    path = run_dir / CONFIG_FILE
    if not path.exists():
        if checkpoints:
            raise RunDirError(f"{run_dir} holds checkpoints but no {CONFIG_FILE}: cannot tell which run they belong "
                              f"to; use a new run_dir, or restore {path}")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, to_yaml(cfg))
        return {}
    try:
        recorded = load_config(path)
    except ConfigError as e:
        raise RunDirError(f"cannot read the run's {path} ({e}); use a new run_dir") from None
    changes = config_changes(recorded, cfg)
    refused = [k for k in changes if not _matches(k, FREE_KEYS + SAFE_KEYS)]
    if refused:
        raise RunDirError(f"{run_dir} belongs to another run: {_describe(changes, refused)} differ from its "
                          f"{CONFIG_FILE}; use a new run_dir (e.g. run_dir={run_dir}-2), or remove {run_dir} to "
                          f"start over")
    needs_flag = [k for k in changes if _matches(k, SAFE_KEYS)]
    if needs_flag and not cfg.train.allow_config_change:
        raise RunDirError(f"resuming {run_dir} with {_describe(changes, needs_flag)} (recorded in its {CONFIG_FILE}); "
                          f"pass train.allow_config_change=true to continue this run with the new values, or use a "
                          f"new run_dir")
    if changes:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                 "changes": {k: list(v) for k, v in changes.items()}}
        with open(run_dir / HISTORY_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")
    return changes


@contextmanager
def claim_run_directory(cfg: RunConfig, *, is_main: bool) -> Iterator[None]:
    """Collective: rank 0 locks `cfg.run_dir` for the life of the block and checks or records its config; every
    rank raises the same RunDirError when that fails."""
    lock = RunLock(cfg.run_dir) if is_main else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
            check_run_directory(cfg)
        except (RunLockError, RunDirError) as e:
            lock.release()
            error = str(e)
    if error := agree_on_error(error):
        raise RunDirError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
