"""Counter-based uniforms: u[b, i] = U(hash(seed, global sequence index, position i)).

No generator state: a sequence's uniforms depend only on (seed, its global index, position), so every DP slice and
every TP replica computes the same numbers for the same sequence, whatever the layout or the order of calls.

The hash is murmur3's 32-bit finaliser (fmix32) chained over 32-bit words:

    combine(h, x) = fmix32((h * 0x9E3779B9 + x) mod 2^32)
    key           = combine(combine(combine(combine(0x243F6A88, seed_lo), seed_hi), index_lo), index_hi)
    a, b          = combine(combine(key, 2 i), 0x5BD1E995), combine(combine(key, 2 i + 1), 0x5BD1E995)
    u             = ((a >> 5) * 2^26 + (b >> 6)) * 2^-53                    (float64, 53 random bits, in [0, 1))
    u32           = (a >> 8) * 2^-24                                          (float32, 24 random bits)

All arithmetic is on non-negative int64 holding 32-bit values, and every 32 x 32-bit product is split into 16-bit
halves so that nothing ever exceeds 2^48: no overflow, no signed/unsigned promotion questions, so the torch version
here and the Triton version (mdm_scale/kernels/_triton.py, same operations) are bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdm_scale.kernels.backend import resolve_backend
from mdm_scale.kernels.seed import split_seed

MASK16 = 0xFFFF
INIT = 0x243F6A88
SALT = 0x5BD1E995
GOLDEN = 0x9E3779B9
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def _low32(x: Tensor) -> Tensor:
    return x - ((x >> 32) << 32)


def _mul32(a: Tensor, c: int) -> Tensor:
    """(a * c) mod 2^32 for 0 <= a, c < 2^32 without leaving [0, 2^48)."""
    c_lo, c_hi = c & MASK16, c >> 16
    return _low32(a * c_lo + (((a * c_hi) & MASK16) << 16))


def fmix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def combine(h: Tensor, x: Tensor | int) -> Tensor:
    return fmix32(_low32(_mul32(h, GOLDEN) + x))


def sequence_keys(seed: int, sequence_index: Tensor) -> Tensor:
    """[b] int64 per-sequence keys in [0, 2^32) from the seed and non-negative global sequence indices."""
    seed_lo, seed_hi = split_seed(seed)
    idx = sequence_index.to(torch.int64)
    h = torch.full_like(idx, INIT)
    h = combine(combine(h, seed_lo), seed_hi)
    return combine(combine(h, _low32(idx)), idx >> 32)


def position_bits(keys: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Two independent 32-bit words a, b [b, l] per (sequence, position)."""
    pos = torch.arange(seq_len, device=keys.device, dtype=torch.int64)[None, :]
    k = keys[:, None]
    return combine(combine(k, 2 * pos), SALT), combine(combine(k, 2 * pos + 1), SALT)


def bits_to_uniform(a: Tensor, b: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    if dtype == torch.float64:
        return ((a >> 5) * 67108864 + (b >> 6)).to(torch.float64) * 2.0**-53
    if dtype == torch.float32:
        return (a >> 8).to(torch.float32) * 2.0**-24
    raise ValueError(f"counter_uniforms supports float64 and float32, not {dtype}")


def counter_uniforms_torch(seed: int, sequence_index: Tensor, seq_len: int,
                           dtype: torch.dtype = torch.float64) -> Tensor:
    a, b = position_bits(sequence_keys(seed, sequence_index), seq_len)
    return bits_to_uniform(a, b, dtype)


def counter_uniforms(seed: int, sequence_index: Tensor, seq_len: int, *, dtype: torch.dtype = torch.float64,
                     backend: str = "auto") -> Tensor:
    """[b, l] uniforms in [0, 1) of sequences with global indices `sequence_index` [b] (int64, >= 0).

    Args:
        seed: run seed in [0, 2^64) (e.g. mix of the config seed and the step: any integer function works, the hash
            decorrelates nearby values).
        sequence_index: [b] global indices of the sequences (e.g. step * global_batch + index in the global batch),
            so that DP = N slices reproduce DP = 1.
        dtype: float64 (53 random bits, the default: mask probabilities t^w reach 1e-30) or float32 (24 bits).
        backend: "auto" | "triton" | "torch"; both give bit-identical results.
    """
    if seq_len >= 2**31:
        raise ValueError("seq_len must be < 2^31")
    if resolve_backend(backend, sequence_index.device) == "triton":
        from mdm_scale.kernels import _triton

        return _triton.counter_uniforms(seed, sequence_index, seq_len, dtype)
    return counter_uniforms_torch(seed, sequence_index, seq_len, dtype)
