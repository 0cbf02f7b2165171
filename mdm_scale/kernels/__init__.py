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

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the `triton` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors through numpy (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """"auto" | "triton" | "torch" -> "triton" | "torch" for tensors on `device`.

    "auto" picks Triton on CUDA when Triton imports, torch otherwise (CPU). "triton" on a CPU device is allowed
    only under TRITON_INTERPRET=1 (the interpreter, for tests); otherwise it is a ValueError, as is a missing Triton.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r} (expected one of {', '.join(BACKENDS)})")
    device = torch.device(device)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("kernels=triton but the triton package is not installed (use kernels=auto or torch)")
    if device.type != "cuda" and not triton_interpreter():
        raise ValueError(f"kernels=triton needs a CUDA device (got {device.type}); on CPU set TRITON_INTERPRET=1 "
                         "(slow, for tests) or use kernels=auto|torch")
    return "triton"


def __getattr__(name: str):  # lazy re-exports, so `import mdm_scale.kernels` stays light
    if name == "counter_uniforms":
        from mdm_scale.kernels.rng import counter_uniforms

        return counter_uniforms
    if name in ("fused_polynomial_masking", "MaskedBatch"):
        from mdm_scale.kernels import masking

        return getattr(masking, name)
    if name == "weighted_linear_cross_entropy":
        from mdm_scale.kernels.linear_cross_entropy import weighted_linear_cross_entropy

        return weighted_linear_cross_entropy
    raise AttributeError(name)
