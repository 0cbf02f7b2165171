"""Loading a RunConfig: configs/<name>.yaml (or a path) merged with `key=value` overrides and `section=preset`
config groups (Hydra's), through OmegaConf onto the dataclasses of mdm_scale/config/schema.py. Every key is checked
against the schema before anything runs (an unknown key fails with the closest valid names), and no config
executes code or reads the environment (resolver calls are refused).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mdm_scale.config import schema
from mdm_scale.config.schema import ConfigError, RunConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _check_keys(node: Any, schema: type, where: str) -> None:
    """Raise ConfigError for any key of `node` (a nested dict) that `schema` does not define."""
    valid = {f.name: f for f in fields(schema)}
    for key, value in node.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{where}{key}'.{hint} Valid keys of '{where.rstrip('.') or 'config'}': "
                f"{', '.join(sorted(valid))}"
            )
        sub = valid[key].type
        sub_type = vars(schema).get(sub) if isinstance(sub, str) else sub  # annotations are strings
        if is_dataclass(sub_type) and isinstance(value, dict):
            _check_keys(value, sub_type, f"{where}{key}.")


def _merge(base: DictConfig, update: dict, source: str) -> DictConfig:
    _check_keys(update, RunConfig, "")
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e.msg if hasattr(e, 'msg') else e}") from None


def _dotted_to_dict(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(name_or_path: str | os.PathLike = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from a named config (configs/<name>.yaml) or a yaml path, then apply overrides.

    Args:
        name_or_path: a config name under configs/ or a path to a yaml file.
        overrides: `a.b=value` items (values parsed as YAML), or `section=preset` to merge
            configs/<section>/<preset>.yaml into that section.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config '{name_or_path}' ({path}); available: {', '.join(names)}")
    cfg = OmegaConf.structured(RunConfig)
    cfg = _merge(cfg, _read_yaml_mapping(path), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        preset = CONFIG_DIR / key / f"{raw}.yaml"
        if "." not in key and (CONFIG_DIR / key).is_dir():
            if not preset.exists():
                names = sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml"))
                raise ConfigError(f"no preset '{raw}' for '{key}'; available: {', '.join(names)}")
            # A preset replaces its whole section: start from the section's defaults.
            cfg[key] = OmegaConf.structured(type(getattr(RunConfig(), key)))
            cfg = _merge(cfg, {key: _read_yaml_mapping(preset)}, str(preset))
            continue
        value = _yaml_value(raw)
        _refuse_resolvers(value, f"override '{item}'")
        cfg = _merge(cfg, _dotted_to_dict(key, value), f"override '{item}'")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


# `${name:...}` calls a resolver (oc.env reads the environment, oc.decode parses, ...): a config file must not
# pull the machine's environment into config.yaml and wandb. Plain `${key}` interpolations stay allowed.
_RESOLVER_CALL = re.compile(r"\$\{[^}:]*:")


def _refuse_resolvers(node: Any, source: str) -> None:
    if isinstance(node, dict):
        for value in node.values():
            _refuse_resolvers(value, source)
    elif isinstance(node, list):
        for value in node:
            _refuse_resolvers(value, source)
    elif isinstance(node, str) and _RESOLVER_CALL.search(node):
        raise ConfigError(f"{source}: resolver interpolations such as {node!r} are not allowed in configs (they read "
                          f"the environment); write the value itself")


def _read_yaml_mapping(path: Path) -> dict:
    """A YAML file's top-level mapping (empty file = {}), with resolver calls refused; ConfigError otherwise."""
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got a {type(values).__name__}")
    _refuse_resolvers(values, str(path))
    return values


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:
        return raw


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
