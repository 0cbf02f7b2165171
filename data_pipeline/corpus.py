"""The embedded default corpora and their tokenized, cached train/held-out token streams.

Training machines have no hub access, so the default corpus is text that already sits on disk: a ~100-article
English Wikipedia excerpt that ships inside the gensim wheel (read straight from the zip; gensim is never installed
or imported), and a ~200 KB public-domain slice committed to the repo for fast tests. Tokenizing is cached per
(source, tokenizer fingerprint) because every rank of every run needs the same arrays.
"""

from __future__ import annotations

import bz2
import hashlib
import multiprocessing
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data_pipeline import books
from data_pipeline.array_cache import load_arrays, save_arrays
from data_pipeline.tokenizer import Tokenizer

SOURCES = ("wikipedia", "books", "mixture", "committed")
"""mixture = wikipedia + books (King James Bible chapters, Shakespeare), the default corpus of `tiny`."""
GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
COMMITTED_PATH = Path(__file__).resolve().parent.parent / "tests" / "data" / "public_domain_sample.txt"
# committed file format: leading '#' comment lines, then documents separated by a line holding exactly this.
DOC_SEPARATOR = "====="
HELDOUT_EVERY = 20  # every 20th document is held out (~5%), starting at index HELDOUT_OFFSET: 10, 30, 50, ...
HELDOUT_OFFSET = 10  # mid-stride, so a corpus of only 11-30 documents still holds one out
MIN_ARTICLE_CHARS = 500  # shorter pages are stubs or disambiguation lists
# Bump when the cleaning or splitting changes, so old caches are not reused.
CORPUS_VERSION = 1

_DROP_LINK_NAMESPACES = ("file:", "image:", "media:", "category:")
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")
_REF_OR_COMMENT = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->", re.DOTALL | re.IGNORECASE)
# Lines that are residue of markup the parser could not match: table rows, category lines, image captions.
_JUNK_LINE = re.compile(
    r"^(\{\||\|\}|\|-|\||!|category:|(thumb|frame|frameless|upright[\d.]*|left|right|center|\d+px)\|)", re.IGNORECASE
)


def find_gensim_wheel() -> Path:
    """Locates the gensim 4.4.0 wheel in `$MDM_SCALE_WHEELS` (set by scripts/in_venv.sh)."""
    hint = ("get it with: pip download --no-deps --only-binary=:all: gensim==4.4.0 -d $MDM_SCALE_WHEELS "
            "(scripts/in_venv.sh does this and sets MDM_SCALE_WHEELS)")
    folder = os.environ.get("MDM_SCALE_WHEELS")
    if not folder:
        raise FileNotFoundError(f"MDM_SCALE_WHEELS is not set (the Wikipedia text comes from the gensim wheel); {hint}")
    wheels = sorted(Path(folder).glob(GENSIM_WHEEL_GLOB))
    if not wheels:
        raise FileNotFoundError(f"no {GENSIM_WHEEL_GLOB} in MDM_SCALE_WHEELS={folder}; {hint}")
    return wheels[-1]


def _iter_pages(xml_stream) -> Iterator[tuple[str, str, bool, str]]:
    """Yields (title, namespace, is_redirect, wikitext) for each <page>, freeing parsed elements as it goes."""
    for _, elem in ET.iterparse(xml_stream, events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        title = elem.findtext("{*}title") or ""
        namespace = elem.findtext("{*}ns") or ""
        redirect = elem.find("{*}redirect") is not None
        text = elem.findtext("{*}revision/{*}text") or ""
        yield title, namespace, redirect, text
        elem.clear()


def _remove_nodes(code, nodes) -> None:
    for node in nodes:
        try:
            code.remove(node)
        except ValueError:  # already gone with a removed parent
            pass


def clean_wikitext(markup: str) -> str:
    """Turns one article's wiki markup into plain prose.

    mwparserfromhell does the parsing; images, categories and interlanguage links are dropped before
    `strip_code()` (it would otherwise keep "thumb|caption" and "Category:X" as text), and the residue of
    malformed markup it cannot parse (unclosed tables or links) is removed line by line afterwards.

    Args:
        markup: the article's wikitext.
    """
    import mwparserfromhell

    # References and comments never belong in the prose; removing them first also shields the parser from the
    # odd unbalanced <ref> that otherwise makes it keep a whole article's citations as text.
    markup = _REF_OR_COMMENT.sub("", markup)
    code = mwparserfromhell.parse(markup)
    drop = []
    for link in code.filter_wikilinks(recursive=True):
        target = str(link.title).strip().lstrip(":").lower()
        if target.startswith(_DROP_LINK_NAMESPACES) or _INTERLANGUAGE.match(target):
            drop.append(link)
    _remove_nodes(code, drop)
    # Wiki tables (results grids, demographics) are cell soup once stripped; references are already invisible.
    _remove_nodes(code, code.filter_tags(matches=lambda t: str(t.tag).strip().lower() == "table"))
    text = code.strip_code(normalize=True, collapse=True)

    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", r"\1", text)  # leftover [[target|label]] -> label
    text = re.sub(r"\{\{[^{}]*\}\}", "", text)  # leftover templates
    text = re.sub(r"\[\[|\]\]|\{\{|\}\}|'{2,}|</?[a-zA-Z][^>\n]*>", "", text)  # stray brackets, bold, html tags
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        if _JUNK_LINE.match(line):
            continue
        line = re.sub(r" ([,.;:!?)])", r"\1", line).replace("( ", "(")  # gaps left by removed refs
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()  # keep paragraph breaks, drop runs of blank lines


def wikipedia_documents() -> list[str]:
    """Clean text of the articles (namespace 0, not redirects, at least `MIN_ARTICLE_CHARS`) in the excerpt.

    Reads the bz2 XML dump member straight out of the gensim wheel zip. About 100 articles, ~3 MB of text.

    Raises:
        FileNotFoundError: the gensim wheel is missing (the message says how to fetch it).
    """
    with zipfile.ZipFile(find_gensim_wheel()) as wheel, wheel.open(WIKI_MEMBER) as raw, bz2.open(raw) as xml:
        markups = [markup for _title, namespace, redirect, markup in _iter_pages(xml)
                   if not redirect and namespace == "0" and not markup.lstrip().lower().startswith("#redirect")]
    workers = min(os.cpu_count() or 1, len(markups))
    if workers > 1:  # parsing is pure-Python-heavy: ~5 s for the excerpt on one core
        with multiprocessing.get_context().Pool(workers) as pool:
            texts = pool.map(clean_wikitext, markups, chunksize=4)
    else:
        texts = [clean_wikitext(m) for m in markups]
    return [t for t in texts if len(t) >= MIN_ARTICLE_CHARS]


def committed_documents(path: Path | None = None) -> list[str]:
    """Documents of the public-domain sample committed at tests/data/public_domain_sample.txt.

    Args:
        path: another file in the same format (leading '#' comment lines, documents separated by a line
            `=====`); defaults to the committed sample.
    """
    text = Path(path or COMMITTED_PATH).read_text(encoding="utf-8")
    lines = text.split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    documents, current = [], []
    for line in lines + [DOC_SEPARATOR]:
        if line.rstrip() == DOC_SEPARATOR:
            doc = "\n".join(current).strip()
            if doc:
                documents.append(doc)
            current = []
        else:
            current.append(line)
    return documents


def load_documents(source: str) -> list[str]:
    """Args:
    source: one of SOURCES.
    """
    if source == "wikipedia":
        return wikipedia_documents()
    if source == "books":
        return books.kjv_documents() + books.shakespeare_documents()
    if source == "mixture":
        return load_documents("wikipedia") + load_documents("books")
    if source == "committed":
        return committed_documents()
    raise ValueError(f"unknown corpus source {source!r}; valid sources: {list(SOURCES)}")


def heldout_document_mask(num_documents: int) -> np.ndarray:
    """Boolean mask of held-out documents: indices 10, 30, 50, ... (every 20th), and at least one (the last).

    Args:
        num_documents: corpus size; must be >= 2 so that both splits are non-empty.
    """
    if num_documents < 2:
        raise ValueError(f"need at least 2 documents for a train/held-out split, got {num_documents}")
    mask = (np.arange(num_documents) % HELDOUT_EVERY) == HELDOUT_OFFSET
    if not mask.any():
        mask[-1] = True
    return mask


def _source_signature(source: str) -> str:
    """Cheap identity of the raw source (no parsing), part of the cache key."""
    if source == "committed":
        return hashlib.sha256(COMMITTED_PATH.read_bytes()).hexdigest()
    if source == "wikipedia":
        wheel = find_gensim_wheel()
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(WIKI_MEMBER)
        return f"{wheel.name}:{info.CRC:08x}:{info.file_size}"
    if source == "books":
        return ":".join(f"{p.name}:{p.stat().st_size}" for p in map(books.find_archive, books.ARCHIVES))
    if source == "mixture":
        return _source_signature("wikipedia") + "|" + _source_signature("books")
    raise ValueError(f"unknown corpus source {source!r}; valid sources: {list(SOURCES)}")


_POOL_MIN_CHARS = 4_000_000
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_document(text: str) -> np.ndarray:
    return np.asarray(_worker_tokenizer.encode(text), dtype=np.uint32)


def tokenize_documents(documents: Sequence[str], tokenizer: Tokenizer, num_workers: int | None = None
                       ) -> list[np.ndarray]:
    """Encodes each document (no EOS added), in document order, in a process pool when that pays off.

    Args:
        documents: the texts.
        tokenizer: picklable tokenizer (pool workers receive a copy).
        num_workers: pool size; 1 runs in-process. By default all cores are used when there are many documents
            (>= 32) with a lot of text (>= 4 MB); below that, tiktoken (~15 MB/s) beats the pool's start-up cost.
    """
    if num_workers is None:
        many = len(documents) >= 32 and sum(map(len, documents)) >= _POOL_MIN_CHARS
        num_workers = (os.cpu_count() or 1) if many else 1
    workers = min(num_workers, len(documents))
    if workers <= 1:
        _init_worker(tokenizer)
        return [_encode_document(d) for d in documents]
    chunksize = max(1, len(documents) // (workers * 8))
    with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        return list(pool.imap(_encode_document, documents, chunksize=chunksize))


def _concat_with_eos(parts: list[np.ndarray], eos_id: int) -> np.ndarray:
    total = sum(len(p) + 1 for p in parts)
    out = np.empty(total, dtype=np.uint32)
    pos = 0
    for p in parts:
        out[pos:pos + len(p)] = p
        out[pos + len(p)] = eos_id
        pos += len(p) + 1
    return out


def build_token_corpus(source: str, tokenizer: Tokenizer, cache_dir: Path, *, num_workers: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train_tokens, heldout_tokens): uint32 1-D streams, each document followed by EOS.

    The held-out split is whole documents (`heldout_document_mask`), so no held-out text leaks into training.
    Results are cached in `cache_dir` under a key of source, source signature, tokenizer fingerprint and
    `CORPUS_VERSION`; a corrupt cache entry is rebuilt with a `CacheCorruptionWarning`.

    Args:
        source: "wikipedia" or "committed".
        tokenizer: e.g. `load_tokenizer("gpt2")`; ids must fit in uint32.
        cache_dir: folder for the cached arrays (created if missing).
        num_workers: tokenization processes; see `tokenize_documents`.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown corpus source {source!r}; valid sources: {list(SOURCES)}")
    if tokenizer.vocab_size > 2**32:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit in uint32")
    fingerprint = tokenizer.fingerprint()
    identity = f"{source}|{_source_signature(source)}|{fingerprint}|v{CORPUS_VERSION}"
    key = f"{source}-{tokenizer.name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    cached = load_arrays(Path(cache_dir), key, ("train", "heldout"))
    if cached is not None:
        arrays, _meta = cached
        return arrays["train"], arrays["heldout"]

    documents = load_documents(source)
    mask = heldout_document_mask(len(documents))
    encoded = tokenize_documents(documents, tokenizer, num_workers)
    train = _concat_with_eos([e for e, h in zip(encoded, mask) if not h], tokenizer.eos_id)
    heldout = _concat_with_eos([e for e, h in zip(encoded, mask) if h], tokenizer.eos_id)
    meta = {
        "source": source,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": fingerprint,
        "corpus_version": CORPUS_VERSION,
        "num_documents": len(documents),
        "num_heldout_documents": int(mask.sum()),
        "train_tokens": len(train),
        "heldout_tokens": len(heldout),
    }
    save_arrays(Path(cache_dir), key, {"train": train, "heldout": heldout}, meta)
    return train, heldout
