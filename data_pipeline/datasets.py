"""What the trainer reads: `train/` and `heldout/` shard directories, from the user's preprocessed data (local,
shared filesystem, or remote storage streamed into a local cache) or from the embedded corpus, which is packed into
MDS shards in the cache on first use.

    <root>/train/              manifest.json + shards    (python -m data_pipeline.preprocess writes this layout)
    <root>/heldout/            manifest.json + shards
    <root>/train_documents/    per-position document ids (only for `--pack documents`): batches then carry them
    <root>/heldout_documents/  and the trainer masks attention across documents
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from data_pipeline.corpus import build_token_corpus
from data_pipeline.shard_format import DOCUMENT_IDS_SUFFIX, MANIFEST_NAME
from data_pipeline.shard_reader import ShardedSequences
from data_pipeline.shard_writer import write_mds
from data_pipeline.tokenizer import Tokenizer

SPLITS = ("train", "heldout")


def embedded_corpus_shards(source: str, tokenizer: Tokenizer, seq_len: int, cache_dir: Path) -> Path:
    """Root of the embedded corpus `source` as wrapped `seq_len` windows in MDS shards, built once and cached.

    Not safe to call from several processes at once: let one rank build it and the others wait (a barrier).
    """
    key = hashlib.sha256(f"{source}|{tokenizer.fingerprint()}|{seq_len}".encode()).hexdigest()[:16]
    root = Path(cache_dir) / f"shards-{source}-{tokenizer.name}-L{seq_len}-{key}"
    if all((root / split / MANIFEST_NAME).exists() for split in SPLITS):
        return root
    for split, tokens in zip(SPLITS, build_token_corpus(source, tokenizer, Path(cache_dir))):
        windows = tokens[: len(tokens) // seq_len * seq_len].reshape(-1, seq_len)
        write_mds(windows, root / split, tokenizer_fingerprint=tokenizer.fingerprint(), overwrite=True)
    return root


def remote_cache_root(remote: str, cache_dir: Path) -> Path:
    """The local directory that caches the shards of `remote` (one per remote root)."""
    return Path(cache_dir) / f"remote-{hashlib.sha256(remote.rstrip('/').encode()).hexdigest()[:16]}"


def _has_document_ids(root: Path, split: str, remote: str | None) -> bool:
    name = f"{split}{DOCUMENT_IDS_SUFFIX}"
    if remote is None:
        return (Path(root) / name / MANIFEST_NAME).exists()
    from data_pipeline.streaming_compat import download_file

    local = Path(root) / name / MANIFEST_NAME
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_file(f"{remote.rstrip('/')}/{name}/{MANIFEST_NAME}", str(local), 60.0)
    except FileNotFoundError:
        return False
    return True


def open_split(root: Path, split: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
               shuffle: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0,
               remote: str | None = None) -> ShardedSequences:
    """Resumable batches of one split; refuses shards made with another tokenizer or sequence length.

    Args:
        root: the directory holding the splits; with `remote`, the local cache (`remote_cache_root`).
        remote: a remote root holding the split directories (MDS), streamed into `root` shard by shard.
        Others: as in `ShardedSequences`.

    Batches are `[b, seq_len]` token ids, or `[b, 2, seq_len]` (tokens, document ids) when the split was packed
    with `--pack documents` (see `split_document_ids`).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    split_remote = None if remote is None else f"{remote.rstrip('/')}/{split}"
    return ShardedSequences(Path(root) / split, seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank,
                            world_size=world_size, shuffle=shuffle, num_workers=num_workers,
                            expected_tokenizer_fingerprint=tokenizer.fingerprint(), remote=split_remote,
                            document_ids=_has_document_ids(Path(root), split, remote))


def split_document_ids(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch from `open_split` -> (tokens [b, l], document ids [b, l] or None)."""
    if batch.dim() == 3:
        return batch[:, 0], batch[:, 1]
    return batch, None
