"""Crash-safe, checksummed on-disk cache for a named set of numpy arrays.

Tokenized corpora are expensive to rebuild and are read by many processes (one per rank), so the cache must
never hand out a half-written or bit-rotted file: every file is written under a temporary name, fsynced and
`os.replace`d into place, and a JSON manifest written last records each file's sha256. A reader trusts an entry
only when the manifest exists and every hash matches; otherwise the caller rebuilds it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from parallel.files import atomic_write

_FORMAT = 1


class CacheCorruptionWarning(UserWarning):
    """An existing cache entry was unreadable or failed its checksum and will be rebuilt."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _manifest_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.manifest.json"


def save_arrays(cache_dir: Path, key: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Stores `arrays` as `<key>.<name>.npy` plus a manifest holding their sha256 and `meta`.

    Args:
        cache_dir: folder of the cache (created if missing).
        key: entry name; must be a valid file-name stem.
        arrays: name -> array (no object dtypes).
        meta: JSON-serializable extra information kept in the manifest (sizes, provenance).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, array in arrays.items():
        data = _npy_bytes(np.ascontiguousarray(array))
        file_name = f"{key}.{name}.npy"
        atomic_write(cache_dir / file_name, data)
        files[name] = {"file": file_name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {"format": _FORMAT, "key": key, "files": files, "meta": meta or {}}
    # The manifest goes last: its presence marks the entry complete.
    atomic_write(_manifest_path(cache_dir, key), json.dumps(manifest, indent=1, sort_keys=True).encode())


def load_arrays(cache_dir: Path, key: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict] | None:
    """Returns `(arrays, meta)` for a complete, intact entry, else None.

    A missing entry returns None silently; an entry that exists but is incomplete, unreadable or fails its
    checksum also returns None, with a `CacheCorruptionWarning`, so the caller rebuilds it.

    Args:
        cache_dir: folder of the cache.
        key: entry name given to `save_arrays`.
        names: the arrays the caller needs; all must be present.
    """
    cache_dir = Path(cache_dir)
    manifest_path = _manifest_path(cache_dir, key)
    if not manifest_path.exists():
        if any(cache_dir.glob(f"{key}.*.npy")):
            warnings.warn(f"cache entry {key!r} in {cache_dir} has no manifest (interrupted write?); rebuilding",
                          CacheCorruptionWarning, stacklevel=3)
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != _FORMAT or manifest.get("key") != key:
            raise ValueError(f"manifest format/key mismatch: {manifest.get('format')!r}, {manifest.get('key')!r}")
        arrays = {}
        for name in names:
            entry = manifest["files"][name]
            data = (cache_dir / entry["file"]).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:
                raise ValueError(f"sha256 mismatch for {entry['file']}: stored {entry['sha256'][:12]}…, "
                                 f"file has {digest[:12]}…")
            arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
        return arrays, manifest.get("meta", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"cache entry {key!r} in {cache_dir} is corrupt ({exc}); rebuilding",
                      CacheCorruptionWarning, stacklevel=3)
        return None
