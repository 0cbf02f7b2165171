"""Fused, chunked output head + weighted SUBS cross-entropy (never materialises the [n, V] logits).

    loss_sum = sum_i row_weight_i * nll_i,    nll_i = logsumexp_{j < V} (h_i . W_j) - h_i . W_{y_i}

over the n rows given (the masked positions: SUBS needs no others), with the vocabulary sharded over TP ranks
(rank r holds rows [vocab_start, vocab_start + v_shard) of W). Columns with global index >= vocab_size (the mask
token and GEMM padding) are excluded, which is exactly what PAD_LOGIT = -1e9 achieves in denoiser.output_logits
(their probability is 0 in fp32 and their gradient 0).

Algorithm (Liger-style, gradients during the forward): for each chunk of `chunk_rows` rows
  1. logits = h_c @ W^T                                         [c, v_shard] fp32, the only large temporary
  2. row max m, sum-exp s, target logit z_y of this shard; under TP all-reduce MAX of m, then SUM of
     (s * exp(m_local - m), z_y) over tp_group (megatron's vocab_parallel_cross_entropy, 2 collectives per chunk)
  3. nll = log s + m - z_y;  logits <- row_weight * (softmax - onehot(y))  in place
  4. grad_hidden[c] = dlogits @ W;  grad_W += dlogits^T @ h_c
Backward only scales the stored gradients by the upstream gradient; d loss_sum / d row_weight = nll.
Steps 2-3 are one Triton kernel (online max/sum-exp over vocabulary blocks, then the in-place gradient; with TP
two kernels around the all-reduce); the GEMMs stay in torch (cuBLAS). The torch backend runs the same algorithm
with in-place torch ops.

TP convention (as megatron's ColumnParallelLinear): hidden is replicated over the TP group and each rank's
grad_hidden is only its shard's partial sum, so the caller passes hidden through
`megatron.core.tensor_parallel.copy_to_tensor_model_parallel_region` first (identity forward, all-reduce of the
gradient backward). `denoiser_weighted_nll` does this for a Denoiser.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from mdm_scale.kernels.backend import resolve_backend


def auto_chunk_rows(n: int, hidden_size: int, vocab_shard: int, min_rows: int = 256,
                    max_bytes: int = 1 << 30) -> int:
    """Rows per chunk (a power of two): Liger's heuristic c * v_shard ~ n * h (a chunk of logits about the size of
    the hidden input), but at least `min_rows` (each chunk re-reads and re-writes the whole [v_shard, h] weight
    gradient, so tiny chunks are bandwidth-bound) and at most `max_bytes` of fp32 logits."""
    rows = max(1, math.ceil(n / max(1, math.ceil(vocab_shard / hidden_size))))
    rows = min(max(rows, min_rows), max(1, max_bytes // (4 * vocab_shard)))
    return 1 << (rows - 1).bit_length()


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _torch_chunk(logits: Tensor, local_target: Tensor, on_shard: Tensor, row_weight: Tensor, n_valid: int,
                 group, write_grad: bool) -> Tensor:
    """Steps 2-3 in plain torch, in place on the [c, v_shard] fp32 chunk. Returns the [c] NLL."""
    c = logits.shape[0]
    valid = logits[:, :n_valid]
    m = valid.max(dim=1).values if n_valid else logits.new_full((c,), float("-inf"))
    if _tp_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    rows = torch.arange(c, device=logits.device)
    target_logit = logits[rows, local_target.clamp_min(0)] * on_shard
    valid.sub_(m[:, None]).exp_()  # exp(logit - global max)
    logits[:, n_valid:] = 0.0
    s = valid.sum(dim=1)
    if _tp_size(group) > 1:
        reduced = torch.stack([s, target_logit])
        dist.all_reduce(reduced, group=group)
        s, target_logit = reduced[0], reduced[1]
    nll = s.log() + m - target_logit
    if write_grad:
        logits.mul_((row_weight / s)[:, None])
        logits[rows, local_target.clamp_min(0)] -= row_weight * on_shard
    return nll


def _triton_chunk(logits: Tensor, local_target: Tensor, row_weight: Tensor, n_valid: int, group, write_grad: bool,
                  block_v: int) -> Tensor:
    from mdm_scale.kernels import _triton

    if _tp_size(group) == 1:  # one launch: stats, NLL and the in-place gradient
        return _triton.ce_forward_fused(logits, local_target, row_weight, n_valid, write_grad, block_v)
    m_local, s_local, target_logit = _triton.ce_shard_stats(logits, local_target, n_valid, block_v)
    m = m_local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    reduced = torch.stack([s_local * torch.exp(m_local - m), target_logit])  # exp(-inf) = 0 on empty shards
    dist.all_reduce(reduced, group=group)
    s, target_logit = reduced[0], reduced[1]
    if write_grad:
        _triton.ce_write_grad(logits, local_target, row_weight, m, s, n_valid, block_v)
    return s.log() + m - target_logit


class _WeightedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, row_weight: Tensor, vocab_start: int,
                vocab_size: int, tp_group, chunk_rows: int, backend: str, block_v: int):
        n, h = hidden.shape
        v_shard = weight.shape[0]
        n_valid = max(0, min(v_shard, vocab_size - vocab_start))  # real-vocabulary columns of this shard
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        write_grad = need_hidden or need_weight
        device = hidden.device
        if torch.is_autocast_enabled(device.type):
            mm_dtype = torch.get_autocast_dtype(device.type)
        else:
            mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.detach().to(mm_dtype)
        rw = row_weight.detach().to(torch.float32)
        local_target = targets - vocab_start
        on_shard = (local_target >= 0) & (local_target < n_valid)
        local_target = torch.where(on_shard, local_target, -1).contiguous()
        nll = torch.empty(n, dtype=torch.float32, device=device)
        grad_hidden = torch.empty(n, h, dtype=mm_dtype, device=device) if need_hidden else None
        # fp32 weights (e.g. under autocast) accumulate their gradient over chunks in fp32, others in mm_dtype
        acc_dtype = torch.float32 if weight.dtype == torch.float32 else mm_dtype
        grad_weight = torch.zeros(v_shard, h, dtype=acc_dtype, device=device) if need_weight else None
        buffer = torch.empty(min(chunk_rows, n), v_shard, dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n, chunk_rows):
                end = min(start + chunk_rows, n)
                hc = hidden[start:end].detach().to(mm_dtype)
                logits = buffer[: end - start]
                if mm_dtype == torch.float32:
                    torch.mm(hc, w.t(), out=logits)
                else:
                    logits.copy_(hc @ w.t())
                if backend == "triton":
                    nll[start:end] = _triton_chunk(logits, local_target[start:end], rw[start:end], n_valid,
                                                   tp_group, write_grad, block_v)
                else:
                    nll[start:end] = _torch_chunk(logits, local_target[start:end], on_shard[start:end],
                                                  rw[start:end], n_valid, tp_group, write_grad)
                if write_grad:
                    dlogits = logits.to(mm_dtype)
                    if need_hidden:
                        torch.mm(dlogits, w, out=grad_hidden[start:end])
                    if need_weight and acc_dtype == mm_dtype:
                        grad_weight.addmm_(dlogits.t(), hc)
                    elif need_weight:
                        grad_weight.add_(dlogits.t() @ hc)
        ctx.save_for_backward(grad_hidden, grad_weight, nll)
        ctx.dtypes = (hidden.dtype, weight.dtype, row_weight.dtype)
        ctx.mark_non_differentiable(nll)
        return (rw * nll).sum(), nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor):
        grad_hidden, grad_weight, nll = ctx.saved_tensors
        hidden_dtype, weight_dtype, row_weight_dtype = ctx.dtypes
        scale = grad_loss.to(torch.float32)
        one = bool(scale == 1)
        gh = gw = grw = None
        if ctx.needs_input_grad[0]:
            gh = (grad_hidden if one else grad_hidden * scale.to(grad_hidden.dtype)).to(hidden_dtype)
        if ctx.needs_input_grad[1]:
            gw = (grad_weight if one else grad_weight * scale.to(grad_weight.dtype)).to(weight_dtype)
        if ctx.needs_input_grad[3]:
            grw = (nll * scale).to(row_weight_dtype)
        return gh, gw, None, grw, None, None, None, None, None, None


def weighted_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, row_weight: Tensor, *,
                                  vocab_start: int = 0, vocab_size: int | None = None, tp_group=None,
                                  chunk_rows: int | None = None, backend: str = "auto",
                                  block_v: int | None = None) -> tuple[Tensor, Tensor]:
    """Weighted NLL of `targets` under the linear head `weight`, without materialising the logits.

    Args:
        hidden: [n, h] features of the rows that carry loss (masked positions); may require grad. Under TP pass it
            through `tensor_parallel.copy_to_tensor_model_parallel_region` first (module docstring).
        weight: [v_shard, h] this rank's rows of the (padded) output matrix; may require grad.
        targets: [n] int64 global token ids (< vocab_size).
        row_weight: [n] per-row weights (A_i(t) * t_weight); may require grad (its gradient is nll).
        vocab_start: global index of weight's first row (rank * v_shard under TP).
        vocab_size: real vocabulary size: global columns >= vocab_size (mask token, padding) are excluded.
            None = every column is real.
        tp_group: tensor-parallel process group over which the vocabulary is sharded (None = not sharded).
        chunk_rows: rows per chunk (None = `auto_chunk_rows`); peak extra memory is chunk_rows * v_shard * 4 bytes.
        backend: "auto" | "triton" | "torch" (`resolve_backend`).
        block_v: vocabulary block of the Triton kernel (None = 4096, or the shard width if smaller).

    Returns:
        (loss_sum, nll): scalar fp32 sum_i row_weight_i * nll_i (differentiable w.r.t. hidden, weight and
        row_weight) and the detached [n] fp32 NLL of every row (global over the TP group).
    """
    n, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [v_shard, {h}], got {tuple(weight.shape)}")
    if targets.shape != (n,) or row_weight.shape != (n,):
        raise ValueError(f"targets and row_weight must be [{n}]")
    v_shard = weight.shape[0]
    vocab_size = vocab_start + v_shard if vocab_size is None else vocab_size
    backend = resolve_backend(backend, hidden.device)
    chunk_rows = auto_chunk_rows(n, h, v_shard) if chunk_rows is None else int(chunk_rows)
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    if block_v is None:
        block_v = min(4096, 1 << max(0, v_shard - 1).bit_length())
    if block_v & (block_v - 1):
        raise ValueError("block_v must be a power of two")
    if n == 0:  # nothing masked: an exact zero that still connects every input to the graph
        zero = (hidden.sum() * 0 + weight.sum() * 0 + row_weight.sum() * 0).to(torch.float32)
        return zero, hidden.new_zeros(0, dtype=torch.float32)
    return _WeightedLinearCrossEntropy.apply(hidden, weight, targets, row_weight, vocab_start, vocab_size, tp_group,
                                             chunk_rows, backend, block_v)


def denoiser_weighted_nll(denoiser, hidden: Tensor, targets: Tensor, row_weight: Tensor, *,
                          chunk_rows: int | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """`weighted_linear_cross_entropy` on a Denoiser's output head (tied or not, any TP size): the fused
    counterpart of `row_weight * masked_token_nll(denoiser, hidden, targets)`.

    Args:
        hidden: [n, h] final-norm features of the masked positions (hidden[masked] in nelbo_from_features).
        targets: [n] x0 at those positions; row_weight: [n] weight at those positions (A_i(t) * t_weight).
    """
    from megatron.core import tensor_parallel

    weight = denoiser.embedding.word_embeddings.weight if denoiser.tie_embeddings else denoiser.output_layer.weight
    lo, _ = denoiser._vocab_slice(weight.shape[0])
    group = None
    if denoiser.config.tensor_model_parallel_size > 1:
        group = denoiser.process_groups.tp
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=group)
    return weighted_linear_cross_entropy(hidden, weight, targets, row_weight, vocab_start=lo,
                                         vocab_size=denoiser.vocab_size, tp_group=group, chunk_rows=chunk_rows,
                                         backend=backend)
