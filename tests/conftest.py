"""Shared fixtures: one single-process gloo group with megatron's parallel state for the in-process tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
# Triton decides between compiled and interpreted kernels from this variable when it is first imported, and
# DeepSpeed imports Triton as a side effect: set it before any test module is collected (tests run on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def dims():
    from parallel.distributed import init_distributed

    return init_distributed(device="cpu", seed=0)
