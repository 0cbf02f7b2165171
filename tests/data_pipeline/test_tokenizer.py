"""Tokenizers give the known GPT-2 ids, round-trip text, and never raise on decode."""

from __future__ import annotations

import pickle

import pytest

from data_pipeline.tokenizer import ByteTokenizer, Gpt2Tokenizer, Tokenizer, load_tokenizer

UNICODE_TEXT = "Zoë's café — naïve façade: 日本語, emoji 🎉, math ∑x², and tabs\tand\nnewlines  "


def test_gpt2_encodes_hello_world_to_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_eos_is_50256_and_vocab_is_50257(gpt2):
    assert gpt2.eos_id == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.decode([gpt2.eos_id]) == "<|endoftext|>"


def test_gpt2_round_trips_unicode(gpt2):
    ids = gpt2.encode(UNICODE_TEXT)
    assert all(0 <= i < gpt2.eos_id for i in ids)
    assert gpt2.decode(ids) == UNICODE_TEXT


def test_gpt2_literal_endoftext_in_text_is_not_eos(gpt2):
    ids = gpt2.encode("end<|endoftext|>start")
    assert gpt2.eos_id not in ids
    assert gpt2.decode(ids) == "end<|endoftext|>start"


def test_gpt2_decode_tolerates_invalid_ids(gpt2):
    text = gpt2.decode([15496, -1, 50257, 10**9, 995])
    assert text == "Hello\ufffd\ufffd\ufffd world"
    # A multi-byte character cut in half decodes to a replacement character instead of raising.
    partial = gpt2.encode("🎉")[:1]
    assert "\ufffd" in gpt2.decode(partial)


def test_gpt2_tokenizer_pickles_cheaply_for_worker_processes(gpt2):
    payload = pickle.dumps(gpt2)
    assert len(payload) < 10_000  # the merge table is rebuilt, not shipped
    assert pickle.loads(payload).encode("Hello world") == [15496, 995]


def test_byte_tokenizer_round_trips_unicode(byte_tokenizer):
    ids = byte_tokenizer.encode(UNICODE_TEXT)
    assert len(ids) == len(UNICODE_TEXT.encode("utf-8"))
    assert max(ids) < 256
    assert byte_tokenizer.decode(ids) == UNICODE_TEXT
    assert (byte_tokenizer.vocab_size, byte_tokenizer.eos_id) == (257, 256)
    assert byte_tokenizer.decode([72, 105, 256, 9999, -3]) == "Hi<|endoftext|>\ufffd\ufffd"


def test_tokenizers_satisfy_protocol_and_have_distinct_stable_fingerprints(gpt2, byte_tokenizer):
    assert isinstance(gpt2, Tokenizer) and isinstance(byte_tokenizer, Tokenizer)
    fingerprints = {gpt2.fingerprint(), byte_tokenizer.fingerprint()}
    assert len(fingerprints) == 2
    assert all(len(f) == 64 and int(f, 16) >= 0 for f in fingerprints)
    assert Gpt2Tokenizer().fingerprint() == gpt2.fingerprint()
    assert ByteTokenizer().fingerprint() == byte_tokenizer.fingerprint()


def test_load_tokenizer_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"'byte', 'gpt2'"):
        load_tokenizer("gpt-2")
