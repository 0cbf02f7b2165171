"""Noise schedules, one family per module, picked by `objective.schedule.kind`."""

from __future__ import annotations

from mdm_scale.config import SCHEDULE_KINDS
from mdm_scale.schedules.base import Masking, Schedule
from mdm_scale.schedules.block import BlockSchedule
from mdm_scale.schedules.learned import LearnedPositionSchedule
from mdm_scale.schedules.lomdm import StateDependentSchedule
from mdm_scale.schedules.univariate import UnivariateSchedule

KINDS = SCHEDULE_KINDS


def build_schedule(cfg, max_seq_len: int) -> Schedule:
    """Build the schedule named by `cfg.kind` (a ScheduleConfig)."""
    if cfg.kind in ("loglinear", "cosine", "polynomial"):
        return UnivariateSchedule(cfg.kind, eps=cfg.eps, exponent=cfg.exponent)
    if cfg.kind in ("left_to_right", "right_to_left"):
        return BlockSchedule(1, reverse=cfg.kind == "right_to_left")
    if cfg.kind == "fixed_order":
        return BlockSchedule(1, order=cfg.order)
    if cfg.kind == "block":
        return BlockSchedule(cfg.block_size, inner=cfg.inner, exponent=cfg.exponent)
    if cfg.kind == "mdm_ls":
        return LearnedPositionSchedule(max_seq_len, cfg.min_exponent, cfg.exponent_range, cfg.exponent_family,
                                       cfg.max_log_exponent)
    if cfg.kind == "lomdm":
        return StateDependentSchedule(cfg.min_exponent, cfg.exponent_range, cfg.exponent_family, cfg.max_log_exponent)
    raise ValueError(f"unknown schedule kind '{cfg.kind}'; valid: {', '.join(KINDS)}")


def is_schedule_parameter(name: str) -> bool:
    """True for a model parameter of the learned schedule (MDM-LS position logits `schedule.*`, LoMDM's
    forward/backward scheduler heads in the denoiser): the parameters the score-function term trains."""
    return name.startswith("schedule.") or ".scheduler_heads." in name


__all__ = ["KINDS", "Masking", "Schedule", "build_schedule", "is_schedule_parameter"]
