"""Config loading: presets, overrides, and clear failures for bad keys."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mdm_scale.config import CONFIG_DIR, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "owt_small", "owt_1b"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.model.hidden_size % cfg.model.num_attention_heads == 0


@pytest.mark.parametrize("objective,kind", [("mdlm", "loglinear"), ("ar", "left_to_right"), ("block", "block"),
                                            ("mdm_ls", "mdm_ls"), ("lomdm", "lomdm"), ("lomdm_paper", "lomdm")])
def test_objective_preset_switches_schedule(objective, kind):
    assert load_config("tiny", [f"objective={objective}"]).objective.schedule.kind == kind


def test_overrides_are_typed_and_applied_in_order():
    cfg = load_config("tiny", ["objective=mdlm", "objective.time_power=0.1", "optimizer.betas=[0.8,0.95]"])
    assert cfg.objective.time_power == 0.1 and cfg.optimizer.betas == (0.8, 0.95)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"model\.hiden_size.*hidden_size"):
        load_config("tiny", ["model.hiden_size=8"])


def test_mistyped_value_names_the_key():
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config("tiny", ["model.hidden_size=wide"])


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: ar, block, lomdm, lomdm_paper, mdlm, mdm_ls"):
        load_config("tiny", ["objective=gpt"])


def test_bad_override_exits_nonzero_before_anything_starts():
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/local.py"), "config=tiny", "model.hiden_size=8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "model.hiden_size" in proc.stderr and "hidden_size" in proc.stderr


@pytest.mark.parametrize("overrides, key", [
    (["objective.schedule.kind=polynomial", "objective.schedule.exponent=0"], "objective.schedule.exponent"),
    (["objective.schedule.kind=polynomial", "objective.schedule.exponent=-1"], "objective.schedule.exponent"),
    (["objective.schedule.kind=polynomial", "objective.schedule.exponent=.inf"], "objective.schedule.exponent"),
    (["objective.schedule.kind=polynomial", "objective.schedule.exponent=.nan"], "objective.schedule.exponent"),
    (["objective=mdm_ls", "objective.schedule.exponent_range=-0.5"], "objective.schedule.exponent_range"),
    (["objective.schedule.eps=1"], "objective.schedule.eps"),
    (["objective.t_min=.nan"], "objective.t_min"),
    (["objective.t_min=1"], "objective.t_min"),
    (["objective.t_min=-0.1"], "objective.t_min"),
    (["objective=mdm_ls", "objective.t_min=0.2"], "objective.estimator=order"),
    (["objective=mdm_ls", "objective.estimator=time", "objective.t_min=0.001", "objective.schedule.exponent_family=log"],
     "exponent_family=log needs objective.estimator=order"),
    (["objective=lomdm", "objective.score_baseline=two_draw", "objective.mask_pairs=mirror"],
     "objective.mask_pairs=independent"),
    (["model.hidden_size=65"], "model.hidden_size 65 must be divisible by model.num_attention_heads"),
    (["model.num_attention_heads=0"], "model.num_attention_heads"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=-3"], "train.steps"),
    (["objective.schedule.kind=spiral"], "objective.schedule.kind must be one of loglinear"),
    (["objective.estimator=reverse"], "objective.estimator must be one of time, order"),
    (["sampling.policy=greedy"], "sampling.policy must be one of ancestral"),
    (["sampling.seq_len=256"], "sampling.seq_len 256 exceeds data.seq_len 128"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.schedule_grad_clip=-1"], "optimizer.schedule_grad_clip"),
    (["optimizer.schedule_grad_clip=.nan"], "optimizer.schedule_grad_clip"),
    (["data.path=a", "data.remote=s3://b"], "both set"),
])
def test_out_of_range_values_are_refused_at_load_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("tiny", overrides)


def test_every_shipped_config_and_preset_loads():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(path.stem)
    for path in sorted((CONFIG_DIR / "objective").glob("*.yaml")):
        load_config("tiny", [f"objective={path.stem}"])


def test_yaml_syntax_error_is_a_config_error_with_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: [64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML \(line \d+"):
        load_config(path)


def test_top_level_list_is_a_config_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_environment_resolvers_are_refused_in_config_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    path = tmp_path / "env.yaml"
    path.write_text("name: ${oc.env:SECRET_TOKEN}\n")
    with pytest.raises(ConfigError, match="resolver interpolations"):
        load_config(path)
    with pytest.raises(ConfigError, match="resolver interpolations"):
        load_config("tiny", ["name=${oc.env:SECRET_TOKEN}"])
    assert load_config("tiny", ["run_dir=runs/${name}-x"]).run_dir == "runs/tiny-x"  # plain interpolation is fine
