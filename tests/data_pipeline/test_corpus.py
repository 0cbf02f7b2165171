"""Corpus readers give clean documents; token corpora split by document and survive cache corruption."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import corpus
from data_pipeline.array_cache import CacheCorruptionWarning
from data_pipeline.corpus import (
    build_token_corpus,
    clean_wikitext,
    committed_documents,
    heldout_document_mask,
    tokenize_documents,
)

MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|<ref|thumb\||Category:")  # wiki syntax and its usual residue


def _split_docs(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Documents of an EOS-terminated stream."""
    ends = np.flatnonzero(tokens == eos_id)
    assert len(ends) and ends[-1] == len(tokens) - 1, "stream must end with EOS"
    return [piece[:-1] for piece in np.split(tokens, ends + 1)[:-1]]  # drop each piece's EOS and the empty tail


def test_committed_documents_are_scenes_without_separators_or_header():
    docs = committed_documents()
    assert len(docs) >= 20
    assert docs[0].startswith("MACBETH")
    assert all(doc and doc == doc.strip() for doc in docs)
    assert not any(line in ("=====",) or line.startswith("# Source") for doc in docs for line in doc.split("\n"))
    assert 150_000 < sum(map(len, docs)) < 300_000


def test_heldout_mask_takes_every_20th_document_and_at_least_one():
    assert np.flatnonzero(heldout_document_mask(45)).tolist() == [10, 30]
    assert np.flatnonzero(heldout_document_mask(5)).tolist() == [4]
    with pytest.raises(ValueError):
        heldout_document_mask(1)


def test_committed_corpus_heldout_split_is_nonempty_and_disjoint_from_train(byte_tokenizer, tmp_path):
    docs = committed_documents()
    train, heldout = build_token_corpus("committed", byte_tokenizer, tmp_path)
    assert train.dtype == np.uint32 and heldout.dtype == np.uint32 and train.ndim == heldout.ndim == 1
    eos = byte_tokenizer.eos_id
    train_docs = [byte_tokenizer.decode(d) for d in _split_docs(train, eos)]
    heldout_docs = [byte_tokenizer.decode(d) for d in _split_docs(heldout, eos)]
    mask = heldout_document_mask(len(docs))
    assert heldout_docs == [d for d, h in zip(docs, mask) if h] and len(heldout_docs) >= 1
    assert train_docs == [d for d, h in zip(docs, mask) if not h]
    assert not set(heldout_docs) & set(train_docs)


def test_committed_corpus_tokenizes_with_gpt2(gpt2, tmp_path):
    train, heldout = build_token_corpus("committed", gpt2, tmp_path)
    assert 30_000 < len(train) < 100_000 and len(heldout) > 1_000  # enough for a few eval windows
    assert int(train.max()) <= gpt2.eos_id and train[-1] == heldout[-1] == gpt2.eos_id
    assert gpt2.decode(train[:4].tolist()).startswith("MAC")


def test_pool_and_in_process_tokenization_agree(gpt2):
    docs = committed_documents()
    assert len(docs) >= 32  # large enough that num_workers=2 really uses the pool
    pooled = tokenize_documents(docs, gpt2, num_workers=2)
    serial = tokenize_documents(docs, gpt2, num_workers=1)
    assert len(pooled) == len(docs)
    assert all(np.array_equal(a, b) for a, b in zip(pooled, serial))


def test_cache_round_trip_loads_without_retokenizing(byte_tokenizer, tmp_path, monkeypatch):
    first = build_token_corpus("committed", byte_tokenizer, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2 and len(list(tmp_path.glob("*.manifest.json"))) == 1

    def fail(source):
        raise AssertionError("cache miss: documents were re-read")

    monkeypatch.setattr(corpus, "load_documents", fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = build_token_corpus("committed", byte_tokenizer, tmp_path)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_cache_is_keyed_by_tokenizer(byte_tokenizer, gpt2, tmp_path):
    byte_train, _ = build_token_corpus("committed", byte_tokenizer, tmp_path)
    gpt2_train, _ = build_token_corpus("committed", gpt2, tmp_path)
    assert len(list(tmp_path.glob("*.manifest.json"))) == 2
    assert len(gpt2_train) < len(byte_train) / 2


def test_corrupted_cache_file_is_detected_and_rebuilt(byte_tokenizer, tmp_path):
    train, heldout = build_token_corpus("committed", byte_tokenizer, tmp_path)
    (npy,) = tmp_path.glob("*.train.npy")
    data = bytearray(npy.read_bytes())
    data[-10] ^= 0xFF  # same size, one flipped byte in the token payload
    npy.write_bytes(bytes(data))

    with pytest.warns(CacheCorruptionWarning, match="sha256 mismatch"):
        train2, heldout2 = build_token_corpus("committed", byte_tokenizer, tmp_path)
    np.testing.assert_array_equal(train2, train)
    np.testing.assert_array_equal(heldout2, heldout)
    with warnings.catch_warnings():  # the rebuilt entry is intact again
        warnings.simplefilter("error")
        np.testing.assert_array_equal(build_token_corpus("committed", byte_tokenizer, tmp_path)[0], train)


def test_truncated_cache_file_is_detected_and_rebuilt(byte_tokenizer, tmp_path):
    train, _ = build_token_corpus("committed", byte_tokenizer, tmp_path)
    (npy,) = tmp_path.glob("*.heldout.npy")
    npy.write_bytes(npy.read_bytes()[:50])
    with pytest.warns(CacheCorruptionWarning):
        train2, heldout2 = build_token_corpus("committed", byte_tokenizer, tmp_path)
    np.testing.assert_array_equal(train2, train)
    assert len(heldout2) > 0


def test_unknown_source_raises(byte_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="wikipedia"):
        build_token_corpus("openwebtext", byte_tokenizer, tmp_path)


def test_clean_wikitext_removes_links_templates_refs_files_and_tables():
    markup = (
        "{{Infobox person|name=X}}'''Ada''' was a [[mathematician|math person]] in [[London]].<ref>{{cite web|url=u}}"
        "</ref> She   wrote notes .\n\n\n\n[[File:Ada.jpg|thumb|A portrait]]\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\nNext paragraph.<!-- hidden -->\n[[Category:Mathematicians]]\n"
        "[[de:Ada Lovelace]]"
    )
    assert clean_wikitext(markup) == "Ada was a math person in London. She wrote notes.\n\nNext paragraph."


def test_wikipedia_documents_are_many_clean_articles(wiki_docs):
    assert len(wiki_docs) > 50
    assert sum(map(len, wiki_docs)) > 2_000_000
    dirty = [doc[:60] for doc in wiki_docs if MARKUP.search(doc)]
    assert not dirty, f"wiki markup left in {len(dirty)} documents: {dirty[:3]}"
    assert all(not doc.lower().startswith("#redirect") for doc in wiki_docs)
    assert any("\n\n" in doc for doc in wiki_docs)  # paragraph breaks are kept


def test_missing_gensim_wheel_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MDM_SCALE_WHEELS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps --only-binary=:all: gensim==4\.4\.0"):
        corpus.wikipedia_documents()


def test_wikipedia_gpt2_token_corpus_builds_and_caches(gpt2, tmp_path_factory, wiki_docs, monkeypatch):
    cache = Path(tmp_path_factory.mktemp("wiki_cache"))
    # Reuse the session's parsed documents; the cache key does not depend on how they were obtained.
    monkeypatch.setattr(corpus, "wikipedia_documents", lambda: list(wiki_docs))
    train, heldout = build_token_corpus("wikipedia", gpt2, cache)
    assert len(train) > 500_000 and len(heldout) > 5_000
    n_heldout = int(heldout_document_mask(len(wiki_docs)).sum())
    assert int((heldout == gpt2.eos_id).sum()) == n_heldout
    assert int((train == gpt2.eos_id).sum()) == len(wiki_docs) - n_heldout
    again = build_token_corpus("wikipedia", gpt2, cache)
    np.testing.assert_array_equal(again[0], train)
