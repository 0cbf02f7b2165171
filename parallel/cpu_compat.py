"""Lets megatron-core run on CPU (gloo) by redirecting its few hard-coded CUDA calls.

megatron-core assumes CUDA in a handful of places (see ../shared/docs/STACK.md). Each patch below is needed
only on CPU and is applied once, process-wide, by `apply()`; on GPU machines nothing here is touched.
"""

from __future__ import annotations

import logging

import torch

_applied = False


def apply() -> None:
    """Patch megatron-core's CUDA-only calls to use the CPU. Idempotent."""
    global _applied
    if _applied:
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils

    # 1. Model build asks torch.cuda.current_device() for the device of new tensors.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # 2. The tensor-parallel RNG tracker saves and restores the "CUDA" generator: use the CPU one.
    def get_state(*args, **kwargs):
        return torch.get_rng_state()

    def set_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    torch.cuda.get_rng_state = get_state
    torch.cuda.manual_seed = torch.manual_seed
    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state

    # 3. The default causal mask is built on "cuda" (fused_softmax imports it by name).
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask

    # 4. Pipeline schedules create their token counter with device="cuda": give that module a torch whose
    #    factories map "cuda" to the CPU (p2p's torch.cuda.synchronize is off: batch_p2p_sync=False on CPU).
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuDeviceTorch()

    # 5. With 2. the tracker's "GPU" generator *is* the CPU one, so its fork() always sees the CPU state change and
    #    logs a warning per dropout call; the states are still saved and restored correctly.
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    _applied = True


class _CpuDeviceTorch:
    """`torch` as seen by megatron's pipeline schedules on CPU: tensor factories asked for "cuda" get the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)
