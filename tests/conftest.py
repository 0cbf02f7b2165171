"""Shared fixtures: one single-process gloo group with megatron's parallel state for the in-process tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def dims():
    from parallel.distributed import init_distributed

    return init_distributed(device="cpu", seed=0)
