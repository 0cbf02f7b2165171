"""Checks a shard directory against its manifest: missing, truncated or corrupt files and manifests that do not fit
the reader raise `ShardError` naming the file (or the field).

`verify_shards` checks a whole local directory (sizes always, sha256 by default); `verify_file` checks one file (the
remote reader calls it on each shard as it arrives in the cache); `check_manifest_fits` refuses a manifest of
another seq_len, dtype, format or tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipeline.shard_format import DTYPE, FORMATS, MANIFEST_NAME
from parallel.files import sha256_file


class ShardError(ValueError):
    """A shard directory is unusable: missing/corrupt/truncated file, or a manifest that does not fit the reader."""


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """Loads `out_dir/manifest.json`, raising `ShardError` naming it when it is missing or malformed."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if not Path(out_dir).is_dir():
            raise ShardError(f"{out_dir}: no such shard directory (a data root holds train/ and heldout/, as "
                             f"written by python -m data_pipeline.preprocess)") from None
        raise ShardError(f"{path}: manifest missing (an incomplete or foreign shard directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: manifest is not valid JSON ({err})") from None
    missing = [k for k in ("format", "num_samples", "seq_len", "dtype", "files", "shards") if k not in manifest]
    if missing:
        raise ShardError(f"{path}: manifest lacks {missing}")
    if manifest["format"] not in FORMATS:
        raise ShardError(f"{path}: unknown format {manifest['format']!r} (expected one of {FORMATS})")
    if sum(s["num_samples"] for s in manifest["shards"]) != manifest["num_samples"]:
        raise ShardError(f"{path}: shard sample counts do not add up to num_samples {manifest['num_samples']}")
    return manifest


def verify_shards(out_dir: str | os.PathLike, *, checksums: bool = True) -> dict:
    """Checks every file listed in the manifest exists with the recorded size and (if `checksums`) sha256.

    Args:
        out_dir: a directory written by `write_mds` / `write_webdataset`.
        checksums: recompute sha256 of every file (False: existence and sizes only, for very large datasets).

    Returns:
        The manifest.

    Raises:
        ShardError: naming the first missing, truncated/resized or corrupt file (or a bad manifest).
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    for entry in manifest["files"]:
        verify_file(out / entry["name"], entry, checksums)
    return manifest


def verify_file(path: Path, entry: dict, checksums: bool) -> None:
    """Raises `ShardError` naming `path` when it is missing, truncated/resized or (with `checksums`) corrupt.

    `entry` is the file's record in the manifest's "files" list (name, bytes, sha256).
    """
    if not path.is_file():
        raise ShardError(f"{path}: missing (listed in {path.parent / MANIFEST_NAME})")
    size = path.stat().st_size
    if size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "has the wrong size"
        raise ShardError(f"{path}: {kind}: {size} bytes, manifest says {entry['bytes']}")
    if checksums and sha256_file(path) != entry["sha256"]:
        raise ShardError(f"{path}: corrupt: sha256 differs from {path.parent / MANIFEST_NAME}")


def check_manifest_fits(manifest: dict, where: str, *, seq_len: int, expected_tokenizer_fingerprint: str | None,
                        format: str | None) -> None:
    """Raises `ShardError` naming `where` and every mismatching field when `manifest` is not what a reader expects.

    Args:
        manifest: as returned by `read_manifest`.
        where: the manifest's location, for the message.
        seq_len: tokens per sample the reader expects.
        expected_tokenizer_fingerprint: if given, must equal the manifest's.
        format: if given ("mds" or "webdataset"), must equal the manifest's.
    """
    mismatches = []
    if manifest["seq_len"] != seq_len:
        mismatches.append(f"seq_len: manifest {manifest['seq_len']}, expected {seq_len}")
    if manifest["dtype"] != DTYPE:
        mismatches.append(f"dtype: manifest {manifest['dtype']!r}, expected {DTYPE!r}")
    if format is not None and manifest["format"] != format:
        mismatches.append(f"format: manifest {manifest['format']!r}, expected {format!r}")
    if (expected_tokenizer_fingerprint is not None
            and manifest.get("tokenizer_fingerprint") != expected_tokenizer_fingerprint):
        mismatches.append(f"tokenizer_fingerprint: manifest {manifest.get('tokenizer_fingerprint')!r}, "
                          f"expected {expected_tokenizer_fingerprint!r}")
    if mismatches:
        raise ShardError(f"{where} does not match this reader: " + "; ".join(mismatches))
