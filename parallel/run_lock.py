"""An exclusive lock on a run directory: one training process tree writes checkpoints and metrics there at a time.

    with RunLock(run_dir):      # rank 0 of a job; RunLockError when another live run holds it
        ...

The lock is a file `<run_dir>/.lock` created with O_EXCL (atomic on local filesystems and NFSv3+), holding the
owner's host, pid and SLURM job id. It is removed on exit. A lock left by a process that died without removing it
(SIGKILL, node loss) is stale and is taken over with a warning when its owner is provably gone: the same host and
no such pid, or the same SLURM job id (a requeued job: SLURM keeps the id and never runs two instances of it).
A lock from another host whose job is unknown cannot be checked from here: the error says whose it is and how
to remove it. (flock would release itself on death, but is unreliable on the network filesystems clusters
share run directories over.)
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockError(RuntimeError):
    """Another live process holds the run directory."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale_reason(holder: dict) -> str | None:
    """Why the recorded owner is certainly gone, or None when it may be alive."""
    me = _owner()
    if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
        return f"left by an earlier run of this SLURM job {me['slurm_job_id']} (requeued)"
    if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on {me['host']} no longer exists"
    return None


def lock_holder(directory: str | os.PathLike) -> dict | None:
    """The owner recorded in `directory`'s lock when it may still be alive; None when the directory is free or
    its lock is stale (then the next RunLock takes it over)."""
    try:
        holder = json.loads((Path(directory) / LOCK_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written or damaged: treat as held
    return None if _stale_reason(holder) else holder


class RunLock:
    """Context manager holding `<directory>/.lock` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder == {}:  # released between our attempt and the read
                    continue
                reason = _stale_reason(holder) if holder is not None else None
                if reason is None:
                    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, SLURM job "
                           f"{holder.get('slurm_job_id') or '-'}, since {holder.get('since')}") if holder else "unknown"
                    raise RunLockError(
                        f"{self.path.parent} is in use by another run ({who}); wait for it to end, use another "
                        f"run_dir, or delete {self.path} if that process is certainly gone") from None
                warnings.warn(f"taking over the stale lock {self.path}: {reason}", stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_owner(), f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise RunLockError(f"{self.path}: another process took the lock while a stale one was being removed")

    def _read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}  # released meanwhile: the retry will take it
        except (OSError, ValueError):
            return None  # being written, or damaged: treat as held

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
