"""Shared, session-scoped fixtures: tokenizers and the Wikipedia excerpt are loaded once per test run."""

from __future__ import annotations

import pytest

from data_pipeline.corpus import wikipedia_documents
from data_pipeline.tokenizer import ByteTokenizer, Gpt2Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def gpt2() -> Gpt2Tokenizer:
    return load_tokenizer("gpt2")


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
    return load_tokenizer("byte")


@pytest.fixture(scope="session")
def wiki_docs() -> list[str]:
    # Needs $MDM_SCALE_WHEELS (scripts/in_venv.sh sets it, CI included): deliberately not skipped when missing.
    return wikipedia_documents()
