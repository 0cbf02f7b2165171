"""Triton kernels (imported only when the Triton backend is selected; see mdm_scale/kernels/__init__.py).

Run on CPU tensors with TRITON_INTERPRET=1 (set before this module is imported: triton.jit reads it when the
kernels are decorated). The hash below must stay operation-for-operation identical to rng.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mdm_scale.kernels.seed import split_seed


# ---------------------------------------------------------------------------------------------------- counter RNG
# Only literals < 2^31 appear below (32-bit constants are passed as 16-bit halves), and every intermediate stays
# in [0, 2^48) on int64: the same integers as rng.py, on any backend.


@triton.jit
def _low32(x):
    return x - ((x >> 32) << 32)


@triton.jit
def _mul32(a, C_LO: tl.constexpr, C_HI: tl.constexpr):
    return _low32(a * C_LO + (((a * C_HI) & 65535) << 16))


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = _mul32(h, 0xCA6B, 0x85EB)  # 0x85EBCA6B
    h = h ^ (h >> 13)
    h = _mul32(h, 0xAE35, 0xC2B2)  # 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _combine(h, x):
    return _fmix32(_low32(_mul32(h, 0x79B9, 0x9E37) + x))  # GOLDEN = 0x9E3779B9


@triton.jit
def _sequence_key(index, seed_lo, seed_hi):
    index = index.to(tl.int64)
    h = index * 0 + 0x243F6A88  # INIT
    h = _combine(_combine(h, seed_lo), seed_hi)
    return _combine(_combine(h, _low32(index)), index >> 32)


@triton.jit
def _uniforms(key, pos, F64: tl.constexpr):
    """key: scalar int64; pos: int64 positions -> uniforms in [0, 1) (float64 with 53 bits or float32 with 24)."""
    a = _combine(_combine(key, 2 * pos), 0x5BD1E995)  # SALT
    if F64:
        b = _combine(_combine(key, 2 * pos + 1), 0x5BD1E995)
        return ((a >> 5) * 67108864 + (b >> 6)).to(tl.float64) * 1.1102230246251565e-16  # 2^-53
    else:
        return (a >> 8).to(tl.float32) * 5.960464477539063e-08  # 2^-24


@triton.jit
def _uniforms_kernel(index_ptr, out_ptr, seq_len, seed_lo, seed_hi, F64: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = _sequence_key(tl.load(index_ptr + row), seed_lo, seed_hi)
    u = _uniforms(key, offs.to(tl.int64), F64)
    tl.store(out_ptr + row * seq_len + offs, u, mask=offs < seq_len)


def counter_uniforms(seed: int, sequence_index: Tensor, seq_len: int, dtype: torch.dtype) -> Tensor:
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"counter_uniforms supports float64 and float32, not {dtype}")
    seed_lo, seed_hi = split_seed(seed)
    index = sequence_index.to(torch.int64).contiguous()
    out = torch.empty(len(index), seq_len, dtype=dtype, device=index.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(seq_len))
        _uniforms_kernel[(len(index), triton.cdiv(seq_len, block))](
            index, out, seq_len, seed_lo, seed_hi, F64=dtype == torch.float64, BLOCK=block)
    return out


# -------------------------------------------------------------------------------------------------------- masking


@triton.jit
def _polynomial_masking_kernel(x0_ptr, t_ptr, t_weight_ptr, w_ptr, w_row_stride, index_ptr, uniforms_ptr, scale_ptr,
                               z_ptr, masked_ptr, weight_ptr, seq_len, seed_lo, seed_hi, mask_id,
                               GIVEN_UNIFORMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < seq_len
    if GIVEN_UNIFORMS:  # [b, l] float64 uniforms from the caller (e.g. draw_noise's generator stream)
        u = tl.load(uniforms_ptr + row * seq_len + offs, mask=valid, other=1.0).to(tl.float64)
    else:  # counter RNG
        key = _sequence_key(tl.load(index_ptr + row), seed_lo, seed_hi)
        u = _uniforms(key, offs.to(tl.int64), True)  # float64
    t = tl.maximum(tl.load(t_ptr + row), 1e-300)  # float64 (1e-300 is a float64 literal: below fp32's range)
    w = tl.load(w_ptr + row * w_row_stride + offs, mask=valid, other=1.0)  # float64 exponents
    # mask probability scale * t^w in log space, as polynomial_masking (scale: float64 from a tensor, not an fp32 arg)
    masked = u < tl.load(scale_ptr) * tl.exp(w * tl.log(t))
    weight = tl.where(masked, ((w / t) * tl.load(t_weight_ptr + row)).to(tl.float32), 0.0)
    x0 = tl.load(x0_ptr + row * seq_len + offs, mask=valid, other=0)
    tl.store(z_ptr + row * seq_len + offs, tl.where(masked, mask_id, x0), mask=valid)
    tl.store(masked_ptr + row * seq_len + offs, masked.to(tl.int8), mask=valid)
    tl.store(weight_ptr + row * seq_len + offs, weight, mask=valid)


def polynomial_masking(x0: Tensor, t: Tensor, t_weight: Tensor, exponents: Tensor, seed: int | None,
                       sequence_index: Tensor | None, mask_id: int, mask_scale: float = 1.0,
                       uniforms: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    b, l = x0.shape
    given = uniforms is not None
    seed_lo, seed_hi = (0, 0) if given else split_seed(seed)
    index = t.new_zeros(b, dtype=torch.int64) if given else sequence_index.to(torch.int64).contiguous()
    uniforms = uniforms.to(torch.float64).contiguous() if given else t.new_zeros(1, dtype=torch.float64)
    x0 = x0.contiguous()
    w = exponents.to(torch.float64)
    w_row_stride = 0 if w.dim() == 1 else l
    w = w.contiguous()
    z_t = torch.empty_like(x0)
    masked = torch.empty(b, l, dtype=torch.int8, device=x0.device)
    weight = torch.empty(b, l, dtype=torch.float32, device=x0.device)
    if x0.numel():
        block = min(1024, triton.next_power_of_2(l))
        _polynomial_masking_kernel[(b, triton.cdiv(l, block))](
            x0, t.to(torch.float64).contiguous(), t_weight.to(torch.float64).contiguous(), w, w_row_stride,
            index, uniforms, torch.tensor([mask_scale], dtype=torch.float64, device=x0.device),
            z_t, masked, weight, l, seed_lo, seed_hi, mask_id, GIVEN_UNIFORMS=given, BLOCK=block)
    return z_t, masked.view(torch.bool), weight


# ---------------------------------------------------------------------------------------------- cross-entropy


@triton.jit
def _ce_row_stats(row_ptr, n_valid, BLOCK_V: tl.constexpr):
    """Online max and sum-exp over the first n_valid columns of one row (any n_valid, BLOCK_V need not divide)."""
    offs = tl.arange(0, BLOCK_V)
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_valid, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(s_vec * tl.exp(m_vec - m_safe), 0)
    return m, s


@triton.jit
def _ce_write_grad(row_ptr, local_target, row_weight, m, s, n_valid, n_cols, BLOCK_V: tl.constexpr):
    """In place: row <- row_weight * (softmax - onehot(target)); padding columns (>= n_valid) <- 0."""
    offs = tl.arange(0, BLOCK_V)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    scale = row_weight / s
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - m_safe) * scale
        g = tl.where(cols == local_target, g - row_weight, g)
        tl.store(row_ptr + cols, g, mask=cols < n_cols)


@triton.jit
def _ce_forward_kernel(logits_ptr, stride_row, target_ptr, row_weight_ptr, m_ptr, s_ptr, target_logit_ptr,
                       nll_ptr, n_valid, n_cols, FUSED: tl.constexpr, WRITE_GRAD: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    """One program per row of a [c, n_cols] fp32 logits chunk. local targets are -1 off this shard.

    FUSED (no TP): computes the NLL and, with WRITE_GRAD, overwrites the row with its gradient, in one launch.
    Otherwise stores this shard's (max, sum-exp relative to it, target logit) for the TP all-reduce."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    local_target = tl.load(target_ptr + row)
    on_shard = local_target >= 0
    target_logit = tl.load(row_ptr + tl.where(on_shard, local_target, 0)).to(tl.float32)
    target_logit = tl.where(on_shard, target_logit, 0.0)
    m, s = _ce_row_stats(row_ptr, n_valid, BLOCK_V)
    if FUSED:
        tl.store(nll_ptr + row, tl.log(s) + m - target_logit)
        if WRITE_GRAD:
            _ce_write_grad(row_ptr, local_target, tl.load(row_weight_ptr + row), m, s, n_valid, n_cols, BLOCK_V)
    else:
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(target_logit_ptr + row, target_logit)


@triton.jit
def _ce_grad_kernel(logits_ptr, stride_row, target_ptr, row_weight_ptr, m_ptr, s_ptr, n_valid, n_cols,
                    BLOCK_V: tl.constexpr):
    """In-place gradient from the TP-reduced (global) max and sum-exp."""
    row = tl.program_id(0).to(tl.int64)
    _ce_write_grad(logits_ptr + row * stride_row, tl.load(target_ptr + row), tl.load(row_weight_ptr + row),
                   tl.load(m_ptr + row), tl.load(s_ptr + row), n_valid, n_cols, BLOCK_V)


def _launch_options(logits: Tensor) -> dict:
    return {} if logits.device.type != "cuda" else {"num_warps": 8}


def ce_forward_fused(logits: Tensor, local_target: Tensor, row_weight: Tensor, n_valid: int, write_grad: bool,
                     block_v: int) -> Tensor:
    """TP = 1: [c] NLL; with write_grad the chunk is overwritten by row_weight * (softmax - onehot)."""
    c, n_cols = logits.shape
    nll = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _ce_forward_kernel[(c,)](logits, logits.stride(0), local_target, row_weight, nll, nll, nll, nll, n_valid,
                                 n_cols, FUSED=True, WRITE_GRAD=write_grad, BLOCK_V=block_v,
                                 **_launch_options(logits))
    return nll


def ce_shard_stats(logits: Tensor, local_target: Tensor, n_valid: int, block_v: int) -> tuple[Tensor, Tensor, Tensor]:
    """This vocabulary shard's [c] max, sum-exp (relative to that max) and target logit (0 off the shard)."""
    c, n_cols = logits.shape
    m, s, target_logit = (torch.empty(c, dtype=torch.float32, device=logits.device) for _ in range(3))
    if c:
        _ce_forward_kernel[(c,)](logits, logits.stride(0), local_target, m, m, s, target_logit, m, n_valid, n_cols,
                                 FUSED=False, WRITE_GRAD=False, BLOCK_V=block_v, **_launch_options(logits))
    return m, s, target_logit


def ce_write_grad(logits: Tensor, local_target: Tensor, row_weight: Tensor, m: Tensor, s: Tensor, n_valid: int,
                  block_v: int) -> None:
    c, n_cols = logits.shape
    if c:
        _ce_grad_kernel[(c,)](logits, logits.stride(0), local_target, row_weight, m.contiguous(), s.contiguous(),
                              n_valid, n_cols, BLOCK_V=block_v, **_launch_options(logits))
