"""What the trainer reads: `train/` and `heldout/` shard directories, from the user's preprocessed data or from the
embedded corpus, which is packed into MDS shards in the cache on first use.

    <root>/train/    manifest.json + shards    (python -m data_pipeline.preprocess writes this layout)
    <root>/heldout/  manifest.json + shards
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from data_pipeline.corpus import build_token_corpus
from data_pipeline.shards import MANIFEST_NAME, ShardedSequences, write_mds
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


def open_split(root: Path, split: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
               shuffle: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> ShardedSequences:
    """Resumable batches of one split; refuses shards made with another tokenizer or sequence length."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    return ShardedSequences(Path(root) / split, seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank,
                            world_size=world_size, shuffle=shuffle, num_workers=num_workers,
                            expected_tokenizer_fingerprint=tokenizer.fingerprint())
