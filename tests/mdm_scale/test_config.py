"""Config loading: presets, overrides, and clear failures for bad keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mdm_scale.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "owt_small", "owt_1b"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.model.hidden_size % cfg.model.num_attention_heads == 0


@pytest.mark.parametrize("objective,kind", [("mdlm", "loglinear"), ("ar", "left_to_right"), ("block", "block"),
                                            ("mdm_ls", "mdm_ls"), ("lomdm", "lomdm")])
def test_objective_preset_switches_schedule(objective, kind):
    assert load_config("tiny", [f"objective={objective}"]).objective.schedule.kind == kind


def test_overrides_are_typed_and_applied_in_order():
    cfg = load_config("tiny", ["objective=mdm_ls", "objective.time_power=0.1", "optimizer.betas=[0.8,0.95]"])
    assert cfg.objective.time_power == 0.1 and cfg.optimizer.betas == (0.8, 0.95)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"model\.hiden_size.*hidden_size"):
        load_config("tiny", ["model.hiden_size=8"])


def test_mistyped_value_names_the_key():
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config("tiny", ["model.hidden_size=wide"])


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: ar, block, lomdm, mdlm, mdm_ls"):
        load_config("tiny", ["objective=gpt"])


def test_bad_override_exits_nonzero_before_anything_starts():
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/local.py"), "config=tiny", "model.hiden_size=8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "model.hiden_size" in proc.stderr and "hidden_size" in proc.stderr
