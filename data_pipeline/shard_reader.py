"""Reads checksummed shard directories (written by `shard_writer.py`) back as exactly resumable batches.

`ShardedSequences` serves samples by *global index* in the order of `EpochBatches` (one per-(seed, epoch)
permutation, strided over ranks; the resume state is a count of global samples, valid for any rank count). MDS is
read with mosaicml-streaming: in place from a local or shared-filesystem directory, or through `StreamingDataset`
from a remote one (s3://, gs://, ...) whose shards it downloads into a local cache on first use; tar shards are
read from a local or shared filesystem through an in-memory index of member offsets. Every file is checked against
the manifest's size and sha256 (`shard_check.py`): local directories when opened, remote shards when they arrive in
the cache.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from data_pipeline.packed import EpochBatches
from data_pipeline.shard_check import ShardError, check_manifest_fits, read_manifest, verify_file, verify_shards
from data_pipeline.shard_format import DOCUMENT_IDS_SUFFIX, DTYPE, MANIFEST_NAME, MDS_COLUMN, WDS_MEMBER_EXT


class _ShardSamples:
    """A `SampleSource` over the shards a manifest lists."""

    def __init__(self, manifest: dict) -> None:
        self._num_samples = int(manifest["num_samples"])

    def __len__(self) -> int:
        return self._num_samples


class _MdsSamples(_ShardSamples):
    """Random access by global index over MDS shards, through mosaicml-streaming.

    A local directory (or a shared filesystem) is read in place with streaming's own shard readers. With `remote`,
    `local` is a cache managed by `StreamingDataset`: a shard is downloaded when first needed (one download per
    node, shared by its ranks and workers) and checked against the manifest before any sample of it is used. Local
    directories do not go through `StreamingDataset`: there is nothing to download or share, and each instance
    holds shared-memory handles until the process exits (streaming registers them with atexit).
    """

    def __init__(self, local: Path, manifest: dict, *, remote: str | None, checksums: bool) -> None:
        from data_pipeline.streaming_compat import StreamingDataset, reader_from_json

        super().__init__(manifest)
        self._local, self._remote, self._checksums = local, remote, checksums
        if remote is not None:
            self._dataset = StreamingDataset(remote=remote, local=str(local), shuffle=False, batch_size=1)
            shards = self._dataset.shards
        else:
            self._dataset = None
            index = json.loads((local / "index.json").read_text())
            shards = [reader_from_json(str(local), None, shard) for shard in index["shards"]]
        expected = f"ndarray:{DTYPE}:{manifest['seq_len']}"
        for shard in shards:
            if shard.column_names != [MDS_COLUMN] or shard.column_encodings != [expected]:
                raise ShardError(f"{local / 'index.json'}: shard {self._basename(shard)} has columns "
                                 f"{shard.column_names} {shard.column_encodings}, expected [{MDS_COLUMN!r}] "
                                 f"[{expected!r}] from the manifest")
        if [shard.samples for shard in shards] != [s["num_samples"] for s in manifest["shards"]]:
            raise ShardError(f"{local / 'index.json'}: per-shard sample counts disagree with the manifest")
        self._shards = shards
        self._starts = np.cumsum([0] + [shard.samples for shard in shards])
        self._entries = {entry["name"]: entry for entry in manifest["files"]}
        self._verified = set() if remote is not None else set(range(len(shards)))  # local: checked when opened

    @staticmethod
    def _basename(shard) -> str:
        return shard.file_pairs[0][0].basename

    def _ensure_verified(self, shard_id: int) -> None:
        self._dataset.prepare_shard(shard_id)  # downloads it into the cache if it is not there yet
        name = self._basename(self._shards[shard_id])
        try:
            verify_file(self._local / name, self._entries[name], self._checksums)
        except ShardError as err:
            (self._local / name).unlink(missing_ok=True)  # never leave a bad copy in the cache
            raise ShardError(f"{err} (downloaded from {self._remote}/{name})") from None
        self._verified.add(shard_id)

    def get(self, indices: np.ndarray) -> np.ndarray:
        shard_ids = np.searchsorted(self._starts, indices, side="right") - 1
        rows = []
        for i, shard_id in zip(indices, shard_ids):
            if shard_id not in self._verified:
                self._ensure_verified(int(shard_id))
            if self._dataset is not None:
                rows.append(self._dataset.get_item(int(i))[MDS_COLUMN])
            else:
                rows.append(self._shards[shard_id].get_item(int(i - self._starts[shard_id]))[MDS_COLUMN])
        return np.stack(rows)


class _TarSamples(_ShardSamples):
    """Random access by global index over tar shards: one scan records each member's data offset."""

    def __init__(self, root: Path, manifest: dict) -> None:
        super().__init__(manifest)
        self._paths = []
        offsets, sizes, files = [], [], []
        for file_idx, shard in enumerate(manifest["shards"]):
            path = root / shard["file"]
            self._paths.append(path)
            count = 0
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if not member.name.endswith("." + WDS_MEMBER_EXT):
                        raise ShardError(f"{path}: unexpected member {member.name!r}")
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
                    files.append(file_idx)
                    count += 1
            if count != shard["num_samples"]:
                raise ShardError(f"{path}: holds {count} samples, {root / MANIFEST_NAME} says {shard['num_samples']}")
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._files = np.asarray(files, dtype=np.int64)
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        # Every member is the same .npy (one dtype, one length): parse its header once, here in the parent, and
        # decode rows with np.frombuffer. np.load parses each header with ast.literal_eval, which CPython 3.11.7
        # can fail in a forked DataLoader worker ("AST constructor recursion depth mismatch", seen in CI).
        self._npy_header, self._npy_dtype, self._npy_shape = b"", None, None
        if len(self._sizes):
            raw = self._read(0)
            first = np.load(io.BytesIO(raw), allow_pickle=False)
            self._npy_header = raw[: len(raw) - first.nbytes]
            self._npy_dtype, self._npy_shape = first.dtype, first.shape

    def _handle(self, file_idx: int):
        if self._pid != os.getpid():  # forked (e.g. a DataLoader worker): never share file offsets with the parent
            self._handles, self._pid = {}, os.getpid()
        if file_idx not in self._handles:
            self._handles[file_idx] = open(self._paths[file_idx], "rb")
        return self._handles[file_idx]

    def _read(self, i: int) -> bytes:
        f = self._handle(int(self._files[i]))
        f.seek(int(self._offsets[i]))
        return f.read(int(self._sizes[i]))

    def get(self, indices: np.ndarray) -> np.ndarray:
        rows = []
        for i in indices:
            raw = self._read(int(i))
            if self._npy_header and raw.startswith(self._npy_header):  # the common case: no header parsing
                rows.append(np.frombuffer(raw, self._npy_dtype, offset=len(self._npy_header)).reshape(self._npy_shape))
            else:
                rows.append(np.load(io.BytesIO(raw), allow_pickle=False))
        return np.stack(rows)

    def __del__(self) -> None:
        for f in getattr(self, "_handles", {}).values():
            f.close()


def _open_samples(path: Path, remote: str | None, *, seq_len: int, expected_tokenizer_fingerprint: str | None,
                  format: str | None, verify_checksums: bool) -> tuple[dict, _ShardSamples]:
    """Checks one shard directory (local, or remote with `path` as its cache) and returns (manifest, source)."""
    if remote is not None:
        from data_pipeline.streaming_compat import download_file

        path.mkdir(parents=True, exist_ok=True)
        try:
            download_file(f"{remote}/{MANIFEST_NAME}", str(path / MANIFEST_NAME), 60.0)
        except (FileNotFoundError, OSError, ValueError) as err:
            raise ShardError(f"{remote}/{MANIFEST_NAME}: cannot fetch the manifest ({err})") from None
        manifest = read_manifest(path)  # the shards themselves are checked as they arrive
    else:
        manifest = verify_shards(path, checksums=verify_checksums)
    where = f"{remote}/{MANIFEST_NAME}" if remote is not None else str(path / MANIFEST_NAME)
    check_manifest_fits(manifest, where, seq_len=seq_len, expected_tokenizer_fingerprint=expected_tokenizer_fingerprint,
                        format=format)
    if manifest["format"] == "mds":
        return manifest, _MdsSamples(path, manifest, remote=remote, checksums=verify_checksums)
    if remote is not None:
        raise ShardError(f"{where}: remote streaming reads MDS shards; put webdataset shards on a shared "
                         f"filesystem and pass its path instead")
    return manifest, _TarSamples(path, manifest)


class _WithDocumentIds:
    """Two sources of the same samples stacked per row: [n, 2, seq_len] = (tokens, document ids)."""

    def __init__(self, tokens: _ShardSamples, document_ids: _ShardSamples) -> None:
        self.tokens, self.document_ids = tokens, document_ids

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.tokens.get(indices), self.document_ids.get(indices)], axis=1)


class ShardedSequences(EpochBatches):
    """`EpochBatches` over the samples of a checked shard directory, local or remote."""

    def __init__(self, path: str | os.PathLike, *, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, expected_tokenizer_fingerprint: str | None = None,
                 format: str | None = None, verify_checksums: bool = True, num_workers: int = 0,
                 remote: str | None = None, document_ids: bool = False) -> None:
        """Args:
        path: directory written by `write_mds` / `write_webdataset`; with `remote`, the local cache directory.
        seq_len: tokens per sample the caller expects; must equal the manifest's.
        batch_size: samples per batch, per rank.
        seed: base seed of the per-epoch permutations.
        rank: this process's index in [0, world_size).
        world_size: number of data-parallel ranks sharing the data.
        shuffle: permute samples each epoch and iterate forever; False keeps order and stops after one pass.
        expected_tokenizer_fingerprint: if given, must equal the manifest's tokenizer fingerprint.
        format: if given ("mds" or "webdataset"), must equal the manifest's format.
        verify_checksums: check every file's sha256 (local: at construction; remote: as each shard arrives).
            Sizes are always checked.
        num_workers: DataLoader worker processes reading ahead (see `EpochBatches`).
        remote: MDS shard directory on remote storage (any URL mosaicml-streaming downloads from, or a path on
            a shared filesystem); shards are copied into `path` on first use.
        document_ids: also read the per-position document ids of `documents` packing from the sibling
            `<path>_documents` (and `<remote>_documents`); batches are then `[b, 2, seq_len]` (tokens, ids).

        Raises:
            ShardError: missing/corrupt/truncated files, or a manifest whose seq_len, tokenizer fingerprint,
                format or dtype differs from what the caller expects.
        """
        self.path = Path(path)
        check = dict(seq_len=seq_len, expected_tokenizer_fingerprint=expected_tokenizer_fingerprint, format=format,
                     verify_checksums=verify_checksums)
        self.manifest, source = _open_samples(self.path, remote, **check)
        if document_ids:
            ids_path = self.path.with_name(self.path.name + DOCUMENT_IDS_SUFFIX)
            ids_remote = None if remote is None else remote.rstrip("/") + DOCUMENT_IDS_SUFFIX
            ids_manifest, ids_source = _open_samples(ids_path, ids_remote, **check)
            if ids_manifest["num_samples"] != self.manifest["num_samples"]:
                raise ShardError(f"{ids_path}: {ids_manifest['num_samples']} rows of document ids for "
                                 f"{self.manifest['num_samples']} samples in {self.path}")
            source = _WithDocumentIds(source, ids_source)
        super().__init__(source, seq_len, batch_size, seed, shuffle, rank, world_size, num_workers)

    def _too_short_message(self) -> str:
        return (f"{self.path} holds {self._num_samples} samples, but one batch on each of {self.world_size} "
                f"rank(s) needs {self.batch_size * self.world_size} samples")

    @property
    def format(self) -> str:
        return self.manifest["format"]

    def __getitem__(self, index: int) -> torch.Tensor:
        """Sample `index` (global, stored order) as a LongTensor `[seq_len]` (`[2, seq_len]` with document ids)."""
        if not 0 <= index < self._num_samples:
            raise IndexError(f"sample {index} outside [0, {self._num_samples})")
        return torch.from_numpy(self.source.get(np.asarray([index]))[0].astype(np.int64))

    def __len__(self) -> int:
        return self._num_samples
