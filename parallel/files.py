"""Durable files: streaming sha256 of a file, fsync of a directory (so a rename into place survives a crash), and
whole-or-absent writes. Shared by checkpoints, shard writers, the corpus cache, run directories and the planners."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry (after creating or renaming files in it); a no-op where directories cannot be
    opened."""
    try:
        fd = os.open(Path(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` so that readers (another process, or after a crash) see either the old file or the
    complete new one: a temporary name in the same folder, fsynced, then `os.replace`d into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
