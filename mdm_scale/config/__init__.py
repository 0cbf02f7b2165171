"""Typed run configuration: dataclasses per component (schema.py), loaded from configs/<name>.yaml plus key=value
overrides (loading.py).

    cfg = load_config("tiny", ["objective=lomdm", "model.hidden_size=64", "train.steps=200"])

`section=preset` (e.g. `objective=ar`) merges configs/<section>/<preset>.yaml into that section, as Hydra's config
groups do. Every key is checked against the dataclasses before anything runs: an unknown key fails with the
closest valid names. No config executes code.
"""

from mdm_scale.config.loading import CONFIG_DIR, load_config, to_yaml
from mdm_scale.config.schema import (
    EB_PROXIES,
    ESTIMATORS,
    EXPONENT_FAMILIES,
    KERNELS,
    LEARNED_KINDS,
    MASK_PAIRS,
    P_POTS_STATISTICS,
    POLICIES,
    RECOMPUTE_CHOICES,
    SCHEDULE_KINDS,
    SCORE_BASELINES,
    T_SAMPLERS,
    TOKENIZERS,
    UNIVARIATE_KINDS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    SamplingConfig,
    ScheduleConfig,
    TrainConfig,
    check_layout,
)

__all__ = [
    "CONFIG_DIR", "EB_PROXIES", "ESTIMATORS", "EXPONENT_FAMILIES", "KERNELS", "LEARNED_KINDS", "MASK_PAIRS",
    "P_POTS_STATISTICS", "POLICIES", "RECOMPUTE_CHOICES", "SCHEDULE_KINDS", "SCORE_BASELINES", "T_SAMPLERS",
    "TOKENIZERS", "UNIVARIATE_KINDS", "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig",
    "ObjectiveConfig", "OptimizerConfig", "ParallelConfig", "RunConfig", "SamplingConfig", "ScheduleConfig",
    "TrainConfig", "check_layout", "load_config", "to_yaml",
]
