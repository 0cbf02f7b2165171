"""Gradients of sequence-parallel parameters: summed over the tensor-parallel group as autograd produces them.

Under sequence parallelism (parallel.sequence_parallel) the norms, the bias adds after row-parallel layers and the
time embedding see only this rank's l / TP positions, so their replicated parameters get partial gradients.
megatron-core marks them `sequence_parallel` and sums them over TP in `finalize_model_grads`, after backward. Our
engines are torch AdamW and DeepSpeed, and DeepSpeed ZeRO 1/2 move each gradient into their own buckets during
backward, so the sum has to happen earlier: a hook on each such parameter all-reduces its gradient over TP
before it is accumulated (tensor hooks run before the AccumulateGrad hooks DeepSpeed registers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn


def mark_sequence_parallel(module: nn.Module) -> None:
    """Mark a replicated module that runs on sequence-sharded activations (e.g. the time embedding)."""
    for param in module.parameters():
        param.sequence_parallel = True


def sum_sequence_parallel_gradients(model: nn.Module) -> int:
    """Hook every parameter marked `sequence_parallel` so its gradient is summed over the TP group; returns how
    many were hooked (0 without tensor parallelism)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = parallel_state.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.requires_grad:
            param.register_hook(all_reduce)
            hooked += 1
    return hooked
