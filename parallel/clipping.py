"""Gradient clipping for models with a learned schedule: one shared clip, or the schedule's gradient clipped on its
own norm (`optimizer.schedule_grad_clip`); either way the two norms are measured over the whole model.

A shared clip rescales every gradient by 1 / max(1, ||g|| / c). When the schedule's score-function gradient is most
of ||g|| (docs/objective.md, section 4d), that factor is the scheduler's noise, and the denoiser's update is
reweighted by it step by step. Split clipping uses two norms over the whole model (all data-parallel ranks, tensor
and pipeline shards), one for the schedule's parameters and one for the rest, and scales each set by its own

    factor_k = 1 / max(1, (||g_k|| + 1e-6) / c_k)        (c_k = 0: unclipped),

the rule of torch's and DeepSpeed's clip_grad_norm_ applied per set. A shared clip (schedule_grad_clip = 0) scales
both sets by the factor of the global norm sqrt(||g_0||^2 + ||g_1||^2) and c_0, as torch and DeepSpeed do. The
engine reports the global norm before clipping and keeps ||g_1|| (logged as grad_norm_schedule): measured here, after
the data-parallel reduction and over every tensor and pipeline shard, it is the same number on every layout, which
a rank's own `.grad` is not (ZeRO 2 keeps no `.grad` at all). One all-reduce of a 2-vector serves both norms, and
every rank takes part even where it holds no schedule parameter (pipeline stages differ in that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

REST, SCHEDULE = 0, 1


class ScheduleClip:
    """Which parameters are the schedule's, the clip of each set (or one shared clip), and the last norms."""

    def __init__(self, model: nn.Module, schedule_parameters: Iterable[nn.Parameter], grad_clip: float,
                 schedule_grad_clip: float, *, shared: bool = False):
        self.schedule_ids = {id(p) for p in schedule_parameters}
        self.clips = (grad_clip, schedule_grad_clip)
        self.shared = shared
        self.device = next(model.parameters()).device  # the all-reduce needs the backend's device (NCCL: cuda)
        self.last_norms: torch.Tensor | None = None
        """[||g_rest||, ||g_schedule||] of the last step, before clipping (None before the first, or when skipped)."""

    def set_of(self, param: nn.Parameter) -> int:
        return SCHEDULE if id(param) in self.schedule_ids else REST

    def norms(self, grads: Iterable[tuple[nn.Parameter, torch.Tensor]],
              reduce: Callable[[torch.Tensor], None] = lambda t: None) -> torch.Tensor:
        """[||g_rest||, ||g_schedule||] of the (parameter, gradient piece) pairs this rank counts; `reduce` sums the
        squares over the ranks that share the model (in place)."""
        squares = torch.zeros(2, dtype=torch.float32, device=self.device)
        for param, grad in grads:
            squares[self.set_of(param)] += grad.detach().float().pow(2).sum()
        reduce(squares)
        self.last_norms = squares.sqrt()
        return self.last_norms

    def factors(self, norms: torch.Tensor) -> list[float]:
        """The multiplier of each set's gradient (1 where unclipped or within its clip)."""
        if self.shared:
            return [_factor(float(norms.norm()), self.clips[0])] * 2
        return [_factor(float(n), c) for n, c in zip(norms, self.clips)]

    def clip(self, params: Iterable[nn.Parameter], counted: Callable[[nn.Parameter], bool] = lambda p: True,
             reduce: Callable[[torch.Tensor], None] = lambda t: None) -> float:
        """Clip `.grad` of `params` in place, set by set; returns the global norm before clipping."""
        params = [p for p in params if p.grad is not None]
        norms = self.norms(((p, p.grad) for p in params if counted(p)), reduce)
        factors = self.factors(norms)
        for p in params:
            if factors[self.set_of(p)] != 1.0:
                p.grad.mul_(factors[self.set_of(p)])
        return float(norms.norm())


def _factor(norm: float, clip: float) -> float:
    return 1.0 / max(1.0, (norm + 1e-6) / clip) if clip else 1.0
