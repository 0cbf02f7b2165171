"""The seed of the counter-based hash as two 32-bit words: one definition for the torch (rng.py) and Triton
(_triton.py) hashes, which must agree bit for bit."""

from __future__ import annotations


def split_seed(seed: int) -> tuple[int, int]:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed & 0xFFFFFFFF, seed >> 32
