"""Fused kernels for the MDM loss path (docs/kernels.md).

* `rng.counter_uniforms`: counter-based uniforms hash(seed, global sequence index, position), bit-identical in
  torch and Triton and independent of the TP/DP layout.
* `masking.fused_polynomial_masking`: uniforms + polynomial masking + z_t + loss weights in one pass.
* `linear_cross_entropy.weighted_linear_cross_entropy`: chunked output head + weighted SUBS cross-entropy that never
  materialises the full logits, vocab-parallel under TP, gradients computed during the forward.

Every entry point takes `backend` = "auto" | "triton" | "torch" (see `resolve_backend`). Triton is imported only
when the Triton backend is used, so this package imports (and its torch backend runs) without Triton.
"""

from __future__ import annotations

from mdm_scale.kernels.backend import BACKENDS, resolve_backend, triton_available, triton_interpreter

__all__ = ["BACKENDS", "resolve_backend", "triton_available", "triton_interpreter"]
