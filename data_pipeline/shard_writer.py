"""Writes packed token sequences as checksummed shards (MDS or WebDataset tar) plus a sha256 manifest.

`write_mds` / `write_webdataset` take a `[num_samples, seq_len]` uint32 array (e.g. the windows of
`PackedBatches`) and write shards plus a `manifest.json` (format, num_samples, seq_len, dtype, tokenizer
fingerprint, and size + sha256 of every file), all into a temporary sibling directory that is renamed into place
only when complete, so a crashed writer never leaves a half-written dataset under the final name. The layout is
described in `shard_format.py`; `shard_check.py` verifies it and `shard_reader.py` reads it back.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from data_pipeline.shard_format import DTYPE, MANIFEST_NAME, MANIFEST_VERSION, MDS_COLUMN, WDS_MEMBER_EXT
from parallel.files import sha256_file


def _check_sequences(sequences: np.ndarray) -> np.ndarray:
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or sequences.shape[0] < 1 or sequences.shape[1] < 1:
        raise ValueError(f"sequences must be a non-empty 2-D [num_samples, seq_len] array, got shape {sequences.shape}")
    if not np.issubdtype(sequences.dtype, np.integer):
        raise ValueError(f"sequences must hold integer token ids, got dtype {sequences.dtype}")
    if sequences.dtype != np.uint32:
        if sequences.min() < 0 or sequences.max() > np.iinfo(np.uint32).max:
            raise ValueError("token ids must fit in uint32")
        sequences = sequences.astype(np.uint32)
    return sequences


def _atomic_write(out_dir: str | os.PathLike, overwrite: bool, write_into) -> Path:
    """Runs `write_into(tmp_dir) -> manifest dict` in a temp sibling of `out_dir`, then renames it into place."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        manifest = write_into(tmp)
        manifest["files"] = [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                             for p in sorted(tmp.iterdir()) if p.is_file()]
        manifest_tmp = tmp / MANIFEST_NAME
        manifest_tmp.write_text(json.dumps(manifest, indent=1))
        with open(manifest_tmp, "rb") as f:
            os.fsync(f.fileno())
        if out.exists():  # overwrite: move the old one aside first so the swap is two renames
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)  # put the previous dataset back
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _manifest_header(fmt: str, sequences: np.ndarray, tokenizer_fingerprint: str | None) -> dict:
    return {"format": fmt, "version": MANIFEST_VERSION, "num_samples": int(sequences.shape[0]),
            "seq_len": int(sequences.shape[1]), "dtype": DTYPE, "tokenizer_fingerprint": tokenizer_fingerprint}


def write_mds(sequences: np.ndarray, out_dir: str | os.PathLike, *, tokenizer_fingerprint: str | None = None,
              shard_size_bytes: int = 1 << 26, overwrite: bool = False) -> Path:
    """Writes `sequences` as MDS shards (mosaicml-streaming's `MDSWriter`, uncompressed) plus `manifest.json`.

    Args:
        sequences: `[num_samples, seq_len]` token ids (uint32, or any integer dtype whose values fit).
        out_dir: final directory; must not exist unless `overwrite`.
        tokenizer_fingerprint: identifies the tokenizer that made the ids; readers can require it.
        shard_size_bytes: MDS shard size limit (bytes per shard file, before a new one is started).
        overwrite: replace an existing `out_dir` (atomically swapped in after the new one is complete).

    Returns:
        `out_dir` as a Path.
    """
    from data_pipeline.streaming_compat import MDSWriter

    sequences = _check_sequences(sequences)
    encoding = f"ndarray:{DTYPE}:{sequences.shape[1]}"

    def write_into(tmp: Path) -> dict:
        with MDSWriter(out=str(tmp), columns={MDS_COLUMN: encoding}, size_limit=int(shard_size_bytes)) as writer:
            for row in sequences:
                writer.write({MDS_COLUMN: row})
        index = json.loads((tmp / "index.json").read_text())
        manifest = _manifest_header("mds", sequences, tokenizer_fingerprint)
        manifest["shards"] = [{"file": s["raw_data"]["basename"], "num_samples": s["samples"]}
                              for s in index["shards"]]
        return manifest

    return _atomic_write(out_dir, overwrite, write_into)


def write_webdataset(sequences: np.ndarray, out_dir: str | os.PathLike, *, tokenizer_fingerprint: str | None = None,
                     samples_per_shard: int = 10_000, overwrite: bool = False) -> Path:
    """Writes `sequences` as WebDataset tar shards (`shard-000000.tar`, one `NNNNNNNNN.tokens.npy` member per
    sample, via `webdataset.TarWriter`) plus `manifest.json`.

    Args:
        sequences: `[num_samples, seq_len]` token ids (uint32, or any integer dtype whose values fit).
        out_dir: final directory; must not exist unless `overwrite`.
        tokenizer_fingerprint: identifies the tokenizer that made the ids; readers can require it.
        samples_per_shard: samples per tar file (the last one may hold fewer).
        overwrite: replace an existing `out_dir` (atomically swapped in after the new one is complete).

    Returns:
        `out_dir` as a Path.
    """
    import webdataset

    sequences = _check_sequences(sequences)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")

    def write_into(tmp: Path) -> dict:
        tmp.mkdir()
        shards = []
        for shard_idx, start in enumerate(range(0, len(sequences), samples_per_shard)):
            name = f"shard-{shard_idx:06d}.tar"
            rows = sequences[start : start + samples_per_shard]
            with webdataset.TarWriter(str(tmp / name), encoder=False) as writer:
                for i, row in enumerate(rows):
                    buf = io.BytesIO()
                    np.save(buf, row, allow_pickle=False)
                    writer.write({"__key__": f"{start + i:09d}", WDS_MEMBER_EXT: buf.getvalue()})
            shards.append({"file": name, "num_samples": len(rows)})
        manifest = _manifest_header("webdataset", sequences, tokenizer_fingerprint)
        manifest["shards"] = shards
        return manifest

    return _atomic_write(out_dir, overwrite, write_into)
