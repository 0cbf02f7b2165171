"""preprocess CLI: exact round trip through shards, input formats agree, per-document packing, bad input, split."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.preprocess import PADDING_DOCUMENT_ID, PreprocessError, main, preprocess
from data_pipeline.shard_reader import ShardedSequences
from data_pipeline.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")
EOS = BYTE.eos_id
SEQ = 16


def _documents(n: int = 23) -> list[str]:
    """Distinct documents of varied lengths (some longer than SEQ, one exactly SEQ - 1 so that with EOS it fills a
    window) including non-ASCII text, so byte ids above 127 are exercised."""
    docs = []
    for i in range(n):
        body = f"doc {i} é✓ " + "abcdefghij"[: i % 10] * (1 + i % 4)
        docs.append(body)
    docs[5] = "x" * (SEQ - 1)
    docs[7] = "long document " * 5
    return docs


def _write_txt(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
    return folder


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({field: d, "id": i}) for i, d in enumerate(docs)]
    lines.insert(len(lines) // 2, "  ")  # blank lines are allowed, not documents
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


def _read(path: Path, seq_len: int = SEQ) -> np.ndarray:
    """All samples of a shard directory in stored order, `[num_samples, seq_len]`."""
    reader = ShardedSequences(path, seq_len=seq_len, batch_size=1, seed=0, shuffle=False)
    return np.concatenate([b.numpy() for b in reader]).astype(np.int64)


def _stream(docs: list[str]) -> np.ndarray:
    return np.asarray([t for d in docs for t in BYTE.encode(d) + [EOS]], dtype=np.int64)


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_wrap_round_trip_reproduces_token_stream(tmp_path, fmt):
    docs = _documents()
    out = tmp_path / "out"
    stats = preprocess([_write_txt(tmp_path / "in", docs)], out, format=fmt, tokenizer="byte", seq_len=SEQ,
                       heldout_every=4, progress=False)
    for split, split_docs in (("train", [d for i, d in enumerate(docs) if i % 4 != 3]),
                              ("heldout", docs[3::4])):
        expected = _stream(split_docs)
        got = _read(out / split).reshape(-1)
        assert len(expected) - SEQ < len(got) <= len(expected)  # only the partial tail window is dropped
        np.testing.assert_array_equal(got, expected[: len(got)])
        assert stats.samples[split] == len(got) // SEQ
        assert stats.tokens[split] == len(expected)
        assert stats.documents[split] == len(split_docs)


def test_jsonl_and_txt_inputs_agree(tmp_path):
    docs = _documents()
    preprocess([_write_txt(tmp_path / "txt", docs)], tmp_path / "a", tokenizer="byte", seq_len=SEQ,
               pack="documents", heldout_every=5, workers=1, progress=False)
    # The same documents split over two JSONL files (input order = argument order), a custom field, 2 workers.
    first = _write_jsonl(tmp_path / "j" / "1.jsonl", docs[:10], field="body")
    second = _write_jsonl(tmp_path / "j" / "2.jsonl", docs[10:], field="body")
    preprocess([first, second], tmp_path / "b", tokenizer="byte", seq_len=SEQ, pack="documents",
               heldout_every=5, text_field="body", workers=2, progress=False)
    for name in ("train", "heldout", "train_documents", "heldout_documents"):
        np.testing.assert_array_equal(_read(tmp_path / "a" / name), _read(tmp_path / "b" / name))


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_documents_packing_never_mixes_documents(tmp_path, fmt):
    docs = _documents(40)
    docs[11] = "y" * SEQ  # with EOS one token over a window: its last chunk is a lone EOS, not padding
    out = tmp_path / "out"
    preprocess([_write_txt(tmp_path / "in", docs)], out, format=fmt, tokenizer="byte", seq_len=SEQ,
               pack="documents", heldout_every=0, progress=False)
    tokens, ids = _read(out / "train"), _read(out / "train_documents")
    assert tokens.shape == ids.shape
    segments = []
    for row_tokens, row_ids in zip(tokens, ids):
        pad = row_ids == PADDING_DOCUMENT_ID
        n = len(row_ids) - int(pad.sum())
        assert not pad[:n].any() and (row_tokens[n:] == EOS).all()  # padding: EOS, only at the end
        assert row_ids[:n].tolist() == sorted(row_ids[:n].tolist())  # ids never go back ...
        steps = np.diff(row_ids[:n])
        assert row_ids[0] == 0 and set(steps.tolist()) <= {0, 1}  # ... count 0, 1, 2, ... and never jump
        for piece in np.split(row_tokens[:n], np.flatnonzero(steps) + 1):
            # EOS only ever closes a piece: a document boundary inside a piece would mean two documents mixed.
            assert not (piece[:-1] == EOS).any()
            segments.append(tuple(piece.tolist()))
    # Every document (with EOS) cut into SEQ-sized chunks, each chunk appears exactly once, nothing else does.
    expected = Counter()
    for d in docs:
        ids_eos = BYTE.encode(d) + [EOS]
        expected.update(tuple(ids_eos[i : i + SEQ]) for i in range(0, len(ids_eos), SEQ))
    assert Counter(segments) == expected


def test_documents_padding_has_its_own_id(tmp_path):
    # Two documents of 3 + EOS and 5 + EOS tokens share one window of 16; 6 padding EOS follow.
    out = tmp_path / "out"
    preprocess([_write_txt(tmp_path / "in", ["abc", "defgh"])], out, tokenizer="byte", seq_len=SEQ,
               pack="documents", heldout_every=0, progress=False)
    tokens, ids = _read(out / "train"), _read(out / "train_documents")
    assert tokens.tolist() == [[97, 98, 99, EOS, 100, 101, 102, 103, 104, EOS] + [EOS] * 6]
    assert ids.tolist() == [[0] * 4 + [1] * 6 + [PADDING_DOCUMENT_ID] * 6]


def test_heldout_split_is_disjoint_and_non_empty(tmp_path):
    docs = _documents(30)
    out = tmp_path / "out"
    # seq_len 1: no tail is dropped, so each split's stream can be cut back into whole documents.
    preprocess([_write_txt(tmp_path / "in", docs)], out, tokenizer="byte", seq_len=1, heldout_every=7,
               progress=False)
    split_docs = {}
    for split in ("train", "heldout"):
        stream = _read(out / split, seq_len=1).reshape(-1).tolist()
        assert stream[-1] == EOS
        texts, cur = [], []
        for t in stream:
            if t == EOS:
                texts.append(BYTE.decode(cur))
                cur = []
            else:
                cur.append(t)
        split_docs[split] = texts
    assert split_docs["train"] and split_docs["heldout"]
    assert not set(split_docs["train"]) & set(split_docs["heldout"])
    assert split_docs["heldout"] == docs[6::7]
    assert sorted(split_docs["train"] + split_docs["heldout"]) == sorted(docs)


def _bad_inputs(folder: Path) -> list[tuple[Path, str]]:
    """(file, text the error must contain) for each kind of bad input."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.txt"
    empty.write_text("")
    latin1 = folder / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    not_json = folder / "notjson.jsonl"
    not_json.write_text('{"text": "fine"}\n{"text": broken\n')
    no_field = folder / "nofield.jsonl"
    no_field.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "wrong key"}\n')
    bad_utf8_line = folder / "badline.jsonl"
    bad_utf8_line.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    unknown = folder / "notes.csv"
    unknown.write_text("text\nhello\n")
    return [(empty, f"{empty}: empty"), (latin1, f"{latin1}: not valid UTF-8"),
            (not_json, f"{not_json}:2: not valid JSON"), (no_field, f"{no_field}:3: no field 'text'"),
            (bad_utf8_line, f"{bad_utf8_line}:2: not valid UTF-8"), (unknown, f"{unknown}: unknown suffix")]


@pytest.mark.parametrize("case", range(6))
def test_bad_input_fails_naming_file_and_line(tmp_path, capsys, case):
    bad, message = _bad_inputs(tmp_path / "bad")[case]
    good = _write_txt(tmp_path / "good", _documents(10))
    with pytest.raises(PreprocessError) as err:
        preprocess([good, bad], tmp_path / "out", tokenizer="byte", seq_len=SEQ, heldout_every=2, progress=False)
    assert message in str(err.value)
    assert main([str(good), str(bad), "--out", str(tmp_path / "out2"), "--tokenizer", "byte", "--seq-len",
                 str(SEQ)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()  # nothing half-written


def test_on_error_skip_skips_and_counts(tmp_path, capsys):
    docs = _documents()
    good = _write_txt(tmp_path / "good", docs)
    bad = [path for path, _ in _bad_inputs(tmp_path / "bad")]
    argv = [str(good), *map(str, bad), "--tokenizer", "byte", "--seq-len", str(SEQ), "--heldout-every", "4"]
    assert main([*argv, "--out", str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    summary = capsys.readouterr().out
    assert "skipped: 6" in summary
    report = json.loads((tmp_path / "skip" / "preprocess.json").read_text())
    assert len(report["skipped"]) == 6
    # The good JSONL lines before/around the bad ones are kept, in order, after the txt documents.
    kept = docs + ["fine", "fine", "also fine", "ok"]
    assert report["documents"]["train"] + report["documents"]["heldout"] == len(kept)
    train = _read(tmp_path / "skip" / "train").reshape(-1)
    expected = _stream([d for i, d in enumerate(kept) if i % 4 != 3])
    np.testing.assert_array_equal(train, expected[: len(train)])


def test_parquet_text_column_gives_the_same_shards_as_text_files(tmp_path):
    import pyarrow
    import pyarrow.parquet as pq

    docs = _documents()
    path = tmp_path / "in" / "docs.parquet"
    path.parent.mkdir()
    pq.write_table(pyarrow.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=3)
    preprocess([path], tmp_path / "a", tokenizer="byte", seq_len=SEQ, heldout_every=4, progress=False)
    preprocess([_write_txt(tmp_path / "txt", docs)], tmp_path / "b", tokenizer="byte", seq_len=SEQ,
               heldout_every=4, progress=False)
    for split in ("train", "heldout"):
        np.testing.assert_array_equal(_read(tmp_path / "a" / split), _read(tmp_path / "b" / split))
    with pytest.raises(PreprocessError, match="body") as err:  # a missing column names the file and the columns
        preprocess([path], tmp_path / "c", tokenizer="byte", seq_len=SEQ, text_field="body", progress=False)
    assert str(path) in str(err.value)


def test_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on an install without the [parquet] extra
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PreprocessError, match="pyarrow") as err:
        preprocess([path], tmp_path / "out", tokenizer="byte", seq_len=SEQ, progress=False)
    assert str(path) in str(err.value)


def test_existing_output_is_refused_before_work(tmp_path):
    good = _write_txt(tmp_path / "good", _documents())
    (tmp_path / "out" / "train").mkdir(parents=True)
    with pytest.raises(PreprocessError, match="already exists"):
        preprocess([good], tmp_path / "out", tokenizer="byte", seq_len=SEQ, heldout_every=4, progress=False)
