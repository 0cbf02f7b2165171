"""Triton kernels (imported only when the Triton backend is selected; see mdm_scale/kernels/__init__.py).

Run on CPU tensors with TRITON_INTERPRET=1 (set before this module is imported: triton.jit reads it when the
kernels are decorated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


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
