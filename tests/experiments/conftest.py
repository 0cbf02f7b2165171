"""Experiment scripts are files, not package modules: load one by name for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(scope="module")
def load_experiment():
    """`load_experiment("uci_adult")` -> experiments/uci_adult.py as a module, registered in sys.modules while
    the test module runs (dataclasses look their module up there)."""
    loaded = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
