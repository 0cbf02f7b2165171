"""Turns raw text files into packed, checksummed train/held-out shards that `shard_reader.ShardedSequences` reads.

    python -m data_pipeline.preprocess INPUT... --out DIR [--format mds|webdataset] [--tokenizer gpt2|byte]
        [--seq-len 1024] [--pack wrap|documents] [--text-field text] [--heldout-every 20] [--workers N]
        [--on-error fail|skip] [--overwrite]

Inputs are `.txt` (one file = one document), `.jsonl` (one JSON object per line, document = `obj[text_field]`) and
`.parquet` (column `text_field`, needs pyarrow); directories are walked recursively for those suffixes. Every
`heldout_every`-th document (input order) goes to `DIR/heldout`, the rest to `DIR/train`, so no held-out text is
ever trained on. Bad input stops the run with an error naming the file (and line) rather than producing garbage,
unless `--on-error skip`, which drops and counts it.

Packing:
  wrap       documents + EOS concatenated and cut into `seq_len` windows, tail dropped (MDLM's OWT setup).
  documents  no window crosses a document boundary: long documents are cut into `seq_len` chunks, shorter pieces
             are packed in order into windows padded at the end with EOS; `DIR/<split>_documents` holds the
             matching `[num_samples, seq_len]` uint32 per-position document ids (0, 1, ... within each window,
             padding gets PADDING_DOCUMENT_ID) so attention can be masked per document (`ids[:, None] == ids`)
             and padding left out of the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.corpus import tokenize_documents
from data_pipeline.shard_check import ShardError
from data_pipeline.shard_format import FORMATS, PADDING_DOCUMENT_ID
from data_pipeline.shard_writer import write_mds, write_webdataset
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
PACKINGS = ("wrap", "documents")
SPLITS = ("train", "heldout")
# Documents are tokenized in batches of about this much text: big enough that a worker pool pays off, small
# enough that the progress bar moves.
_BATCH_CHARS = 16_000_000
_BATCH_DOCS = 20_000


class PreprocessError(ValueError):
    """Unusable input or settings; the message names the file (and line or row) at fault."""


@dataclass
class Stats:
    """Counts for the end-of-run summary (and `DIR/preprocess.json`)."""

    documents: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    tokens: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    samples: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    dropped_tokens: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    padding_tokens: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    skipped: list = field(default_factory=list)  # error messages of skipped inputs
    ignored_files: int = 0  # files with other suffixes found while walking directories
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------------ inputs


def find_inputs(inputs: Sequence[str | os.PathLike], stats: Stats, on_error: str) -> list[Path]:
    """Expands the command-line inputs to files, in a deterministic order (sorted within each directory).

    A file named explicitly with an unknown suffix is an error (or skipped); inside a directory such files are
    just ignored (and counted), since data folders routinely hold READMEs and the like.
    """
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    if p.suffix.lower() in SUFFIXES:
                        files.append(p)
                    else:
                        stats.ignored_files += 1
        elif not path.exists():
            raise PreprocessError(f"{path}: no such file or directory")
        elif path.suffix.lower() not in SUFFIXES:
            _fail(PreprocessError(f"{path}: unknown suffix {path.suffix!r}; expected one of {list(SUFFIXES)}"),
                  stats, on_error)
        else:
            files.append(path)
    return files


def _fail(err: PreprocessError, stats: Stats, on_error: str) -> None:
    if on_error != "skip":
        raise err
    stats.skipped.append(str(err))


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PreprocessError(f"{where}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})"
                              ) from None


def _read_txt(path: Path) -> Iterator[str]:
    text = _utf8(path.read_bytes(), str(path))
    if not text.strip():
        raise PreprocessError(f"{path}: empty file (no text)")
    yield text


def _read_jsonl(path: Path, text_field: str, stats: Stats, on_error: str) -> Iterator[str]:
    """One document per line; blank lines are allowed, every other bad line is an error naming its number."""
    found = bad = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = _utf8(raw, where)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PreprocessError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(obj, dict):
                    raise PreprocessError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                if text_field not in obj:
                    raise PreprocessError(f"{where}: no field {text_field!r} (fields: {sorted(obj)[:10]})")
                text = obj[text_field]
                if not isinstance(text, str):
                    raise PreprocessError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
                if not text.strip():
                    raise PreprocessError(f"{where}: field {text_field!r} is empty")
            except PreprocessError as err:
                _fail(err, stats, on_error)
                bad += 1
                continue
            found += 1
            yield text
    if found == 0 and bad == 0:
        raise PreprocessError(f"{path}: empty file (no JSON lines)")


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PreprocessError(f"{path}: reading parquet needs pyarrow, which is not installed "
                              f"(pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError flavours
        raise PreprocessError(f"{path}: not a readable parquet file ({err})") from None
    if text_field not in parquet.schema_arrow.names:
        raise PreprocessError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names[:10]})")
    if parquet.metadata.num_rows == 0:
        raise PreprocessError(f"{path}: empty file (no rows)")
    row = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=[text_field]):  # streamed: files may be large
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise PreprocessError(f"{path}: row {row}: column {text_field!r} is {type(text).__name__}, "
                                      f"not a string")
            if not text.strip():
                raise PreprocessError(f"{path}: row {row}: column {text_field!r} is empty")
            row += 1
            yield text


def iter_documents(files: Sequence[Path], text_field: str, stats: Stats, on_error: str) -> Iterator[str]:
    """Yields every document of `files` in order; with on_error="skip", a bad file or JSONL line is dropped and
    recorded in `stats.skipped` instead of raising (a bad txt/parquet file is dropped whole)."""
    for path in files:
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                yield from _read_jsonl(path, text_field, stats, on_error)
            else:
                # Whole-file readers are materialised first so a skipped file contributes nothing at all.
                docs = list(_read_txt(path) if suffix == ".txt" else _read_parquet(path, text_field))
                yield from docs
        except PreprocessError as err:
            _fail(err, stats, on_error)
        except OSError as err:
            _fail(PreprocessError(f"{path}: cannot read ({err})"), stats, on_error)


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------------- packing


def pack_wrap(docs: Sequence[np.ndarray], seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenates documents (each already ending in EOS) and cuts `seq_len` windows.

    Returns:
        (`[num_samples, seq_len]` uint32 windows, number of tail tokens dropped).
    """
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.uint32)
    num = len(stream) // seq_len
    return stream[: num * seq_len].reshape(num, seq_len).astype(np.uint32, copy=False), len(stream) - num * seq_len


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Packs documents (each already ending in EOS) so that no window crosses a document boundary.

    A document of length L becomes L // seq_len full windows of its own plus a remainder piece; remainders are
    packed in input order (next-fit) into windows that are closed, and padded with `pad_id`, when the next piece
    does not fit. Order-preserving next-fit wastes a little more padding than first-fit-decreasing but keeps
    the output a pure, easily checked function of the input order.

    Returns:
        (tokens, document ids, padding token count): both arrays `[num_samples, seq_len]` uint32; document ids
        count 0, 1, ... within each window, and padding positions get `PADDING_DOCUMENT_ID`.
    """
    windows: list[tuple[np.ndarray, np.ndarray]] = []
    current: list[np.ndarray] = []
    used = 0
    padding = 0

    def close() -> None:
        nonlocal current, used, padding
        if not current:
            return
        tokens = np.full(seq_len, pad_id, dtype=np.uint32)
        ids = np.empty(seq_len, dtype=np.uint32)
        pos = 0
        for i, piece in enumerate(current):
            tokens[pos : pos + len(piece)] = piece
            ids[pos : pos + len(piece)] = i
            pos += len(piece)
        ids[pos:] = PADDING_DOCUMENT_ID
        padding += seq_len - pos
        windows.append((tokens, ids))
        current, used = [], 0

    zeros = np.zeros(seq_len, dtype=np.uint32)
    for doc in docs:
        full = len(doc) // seq_len
        for k in range(full):
            windows.append((np.asarray(doc[k * seq_len : (k + 1) * seq_len], dtype=np.uint32), zeros))
        rest = doc[full * seq_len :]
        if len(rest) == 0:
            continue
        if used + len(rest) > seq_len:
            close()
        current.append(rest)
        used += len(rest)
    close()
    if not windows:
        empty = np.zeros((0, seq_len), dtype=np.uint32)
        return empty, empty.copy(), 0
    return np.stack([w[0] for w in windows]), np.stack([w[1] for w in windows]), padding


# --------------------------------------------------------------------------------------------------------- run


def is_heldout(index: int, heldout_every: int) -> bool:
    """Document `index` (0-based, input order) is held out when it is the `heldout_every`-th, 2x-th, ... one."""
    return heldout_every > 0 and index % heldout_every == heldout_every - 1


def preprocess(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, format: str = "mds",
               tokenizer: str | Tokenizer = "gpt2", seq_len: int = 1024, pack: str = "wrap",
               text_field: str = "text", heldout_every: int = 20, workers: int | None = None,
               on_error: str = "fail", overwrite: bool = False, progress: bool | None = None) -> Stats:
    """Reads, tokenizes, splits, packs and writes the shards; the library form of the CLI.

    Args:
        inputs: files and/or directories.
        out: output directory; gets `train/`, `heldout/` (and `train_documents/`, `heldout_documents/` for
            `pack="documents"`) plus `preprocess.json`.
        format: "mds" or "webdataset".
        tokenizer: a name for `load_tokenizer` or a tokenizer object.
        seq_len: tokens per sample.
        pack: "wrap" or "documents".
        text_field: JSONL key / parquet column holding the text.
        heldout_every: every n-th document is held out; 0 disables the held-out split.
        workers: tokenization processes (None: `tokenize_documents`' default heuristic).
        on_error: "fail" raises `PreprocessError` on bad input; "skip" drops it and records it in `Stats.skipped`.
        overwrite: replace existing output directories.
        progress: show a tqdm bar (None: only when stderr is a terminal).

    Raises:
        PreprocessError: bad input (naming the file, and the line for JSONL) or settings.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    if format not in FORMATS:
        raise PreprocessError(f"unknown format {format!r}; valid: {list(FORMATS)}")
    if pack not in PACKINGS:
        raise PreprocessError(f"unknown packing {pack!r}; valid: {list(PACKINGS)}")
    if seq_len < 1:
        raise PreprocessError(f"seq_len must be >= 1, got {seq_len}")
    if heldout_every < 0 or heldout_every == 1:
        raise PreprocessError(f"heldout_every must be 0 (no held-out split) or >= 2, got {heldout_every}")
    if on_error not in ("fail", "skip"):
        raise PreprocessError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if tok.vocab_size > 2**32:
        raise PreprocessError(f"tokenizer vocab_size {tok.vocab_size} does not fit in uint32")
    out = Path(out)
    splits = SPLITS if heldout_every else ("train",)
    targets = {s: out / s for s in splits}
    if pack == "documents":
        targets.update({f"{s}_documents": out / f"{s}_documents" for s in splits})
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:  # fail before the (possibly long) tokenization, not after
        raise PreprocessError(f"output already exists: {', '.join(existing)} (pass --overwrite to replace)")

    stats = Stats()
    files = find_inputs(inputs, stats, on_error)
    if not files:
        raise PreprocessError(f"no input files with suffix {list(SUFFIXES)} in {[str(i) for i in inputs]}")
    encoded: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    eos = np.asarray([tok.eos_id], dtype=np.uint32)
    index = 0
    with tqdm(unit="doc", desc="tokenizing", disable=(not sys.stderr.isatty()) if progress is None else not progress,
              dynamic_ncols=True) as bar:
        for batch in _batches(iter_documents(files, text_field, stats, on_error)):
            for ids in tokenize_documents(batch, tok, workers):
                split = "heldout" if is_heldout(index, heldout_every) else "train"
                encoded[split].append(np.concatenate([ids, eos]))
                stats.documents[split] += 1
                stats.tokens[split] += len(ids) + 1
                index += 1
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(len(batch))
            bar.set_postfix_str(f"{sum(stats.tokens.values()) / elapsed:,.0f} tok/s")
    if index == 0:
        raise PreprocessError(f"no documents read from {len(files)} input file(s) ({len(stats.skipped)} skipped)")
    if heldout_every and stats.documents["heldout"] == 0:
        raise PreprocessError(f"only {index} document(s): with --heldout-every {heldout_every} none is held out "
                              f"(use a smaller --heldout-every, or 0 for no held-out split)")

    arrays: dict[str, np.ndarray] = {}
    for split in splits:
        if pack == "wrap":
            arrays[split], stats.dropped_tokens[split] = pack_wrap(encoded[split], seq_len)
        else:
            arrays[split], arrays[f"{split}_documents"], stats.padding_tokens[split] = pack_documents(
                encoded[split], seq_len, tok.eos_id)
        stats.samples[split] = len(arrays[split])
        if stats.samples[split] == 0:
            raise PreprocessError(f"{split} split has {stats.tokens[split]} tokens, fewer than one window of "
                                  f"--seq-len {seq_len}; nothing would be written")
    fingerprint = tok.fingerprint()
    for name, array in arrays.items():
        if format == "mds":
            write_mds(array, targets[name], tokenizer_fingerprint=fingerprint, overwrite=overwrite)
        else:
            write_webdataset(array, targets[name], tokenizer_fingerprint=fingerprint, overwrite=overwrite)
    stats.seconds = time.perf_counter() - start
    summary = {"inputs": [str(i) for i in inputs], "format": format, "tokenizer": tok.name,
               "tokenizer_fingerprint": fingerprint, "seq_len": seq_len, "pack": pack, "text_field": text_field,
               "heldout_every": heldout_every, "documents": stats.documents, "tokens": stats.tokens,
               "samples": stats.samples, "dropped_tail_tokens": stats.dropped_tokens,
               "padding_tokens": stats.padding_tokens, "skipped": stats.skipped,
               "ignored_files": stats.ignored_files, "seconds": round(stats.seconds, 3)}
    (out / "preprocess.json").write_text(json.dumps(summary, indent=1))
    return stats


def format_summary(stats: Stats, out: Path, pack: str) -> str:
    """The one-screen report printed at the end of a run."""
    lines = [f"wrote {out}  ({stats.seconds:.1f} s)",
             f"{'split':<9}{'documents':>12}{'tokens':>16}{'samples':>12}"
             + (f"{'padding':>14}" if pack == "documents" else f"{'dropped tail':>14}")]
    for s in SPLITS:
        extra = stats.padding_tokens[s] if pack == "documents" else stats.dropped_tokens[s]
        lines.append(f"{s:<9}{stats.documents[s]:>12,}{stats.tokens[s]:>16,}{stats.samples[s]:>12,}{extra:>14,}")
    total_tokens = sum(stats.tokens.values())
    rate = total_tokens / stats.seconds if stats.seconds else 0.0
    lines.append(f"total    {sum(stats.documents.values()):>12,}{total_tokens:>16,}  ({rate:,.0f} tokens/s)")
    lines.append(f"skipped: {len(stats.skipped)}" + (f"  ignored files (other suffixes): {stats.ignored_files}"
                                                     if stats.ignored_files else ""))
    for msg in stats.skipped[:5]:
        lines.append(f"  {msg}")
    if len(stats.skipped) > 5:
        lines.append(f"  ... and {len(stats.skipped) - 5} more (all listed in {out / 'preprocess.json'})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.preprocess",
                                description="Tokenize text/JSONL/parquet into packed train/held-out shards.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt/.jsonl/.parquet files or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=FORMATS, default="mds")
    p.add_argument("--tokenizer", choices=("gpt2", "byte"), default="gpt2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--pack", choices=PACKINGS, default="wrap")
    p.add_argument("--text-field", default="text", help="JSONL key / parquet column of the text")
    p.add_argument("--heldout-every", type=int, default=20, help="every n-th document is held out (0: none)")
    p.add_argument("--workers", type=int, default=None, help="tokenization processes (default: automatic)")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    p.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0 on success, 2 on bad input or settings (message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        stats = preprocess(args.inputs, args.out, format=args.format, tokenizer=args.tokenizer,
                           seq_len=args.seq_len, pack=args.pack, text_field=args.text_field,
                           heldout_every=args.heldout_every, workers=args.workers, on_error=args.on_error,
                           overwrite=args.overwrite)
    except (PreprocessError, ShardError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(stats, Path(args.out), args.pack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
