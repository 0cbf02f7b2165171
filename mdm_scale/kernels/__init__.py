"""Fused kernels for the MDM loss path (docs/kernels.md).

* `linear_cross_entropy.weighted_linear_cross_entropy`: chunked output head + weighted SUBS cross-entropy that never
  materialises the full logits, vocab-parallel under TP, gradients computed during the forward.

The masking stays in torch (`Schedule.masking` + `objective.apply_noise`); the fused polynomial masking kernel and
its counter RNG were removed (docs/kernels.md, "Masking: not fused").

Every entry point takes `backend` = "auto" | "triton" | "torch" (see `resolve_backend`). Triton is imported only
when the Triton backend is used, so this package imports (and its torch backend runs) without Triton.
"""

from __future__ import annotations

from mdm_scale.kernels.backend import BACKENDS, resolve_backend, triton_available, triton_interpreter

__all__ = ["BACKENDS", "resolve_backend", "triton_available", "triton_interpreter"]
