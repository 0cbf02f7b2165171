"""Which implementation runs a kernel: "auto" | "triton" | "torch", resolved per device (docs/kernels.md)."""

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
