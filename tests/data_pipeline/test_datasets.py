"""The trainer's data: the embedded corpus packed into shards once, or the user's shards, checked on open."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.corpus import build_token_corpus
from data_pipeline.datasets import embedded_corpus_shards, open_split
from data_pipeline.shard_check import ShardError
from data_pipeline.shard_writer import write_webdataset
from data_pipeline.tokenizer import load_tokenizer


def test_embedded_corpus_is_packed_once_into_the_token_stream(tmp_path):
    tok = load_tokenizer("byte")
    root = embedded_corpus_shards("committed", tok, 32, tmp_path)
    stamp = (root / "train" / "manifest.json").stat().st_mtime_ns
    assert embedded_corpus_shards("committed", tok, 32, tmp_path) == root
    assert (root / "train" / "manifest.json").stat().st_mtime_ns == stamp  # cached, not rebuilt
    train, _ = build_token_corpus("committed", tok, tmp_path)
    reader = open_split(root, "train", tok, seq_len=32, batch_size=4, seed=0, shuffle=False)
    streamed = np.concatenate([b.numpy().ravel() for b in reader])
    assert np.array_equal(streamed, train[: len(streamed)]) and len(train) - len(streamed) < 32 * 4 + 32


def test_shards_of_another_tokenizer_are_refused(tmp_path):
    write_webdataset(np.zeros((8, 16), dtype=np.uint32), tmp_path / "train", tokenizer_fingerprint="other")
    with pytest.raises(ShardError, match="tokenizer_fingerprint"):
        open_split(tmp_path, "train", load_tokenizer("byte"), seq_len=16, batch_size=2, seed=0)
