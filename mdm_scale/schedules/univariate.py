"""Univariate schedules (every position shares alpha(t)): log-linear (MDLM), cosine, polynomial."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mdm_scale.schedules.base import Masking, Schedule, polynomial_masking


class UnivariateSchedule(Schedule):
    """alpha(t) for all positions.

    Args:
        kind: "loglinear" (alpha = 1 - (1 - eps) t, A = 1/t, MDLM), "cosine" (alpha = cos(pi t / 2),
            A = (pi/2) / tan(pi t / 4)) or "polynomial" (alpha = 1 - t^w, A = w / t).
        eps: loglinear's floor: at t = 1 a position stays clean with probability eps.
        exponent: polynomial's w.
    """

    def __init__(self, kind: str = "loglinear", eps: float = 1e-3, exponent: float = 1.0):
        super().__init__()
        if kind not in ("loglinear", "cosine", "polynomial"):
            raise ValueError(f"unknown univariate schedule '{kind}' (loglinear | cosine | polynomial)")
        self.kind, self.eps, self.exponent = kind, eps, exponent

    def mask_prob_and_velocity(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """[b] float64 times -> ([b] 1 - alpha(t), [b] A(t))."""
        t = t.to(torch.float64)
        if self.kind == "loglinear":
            return (1 - self.eps) * t, 1 / t.clamp_min(1e-300)
        if self.kind == "cosine":
            quarter = math.pi * t / 4
            return 2 * torch.sin(quarter) ** 2, (math.pi / 2) / torch.tan(quarter).clamp_min(1e-300)
        m = polynomial_masking(t, torch.tensor([self.exponent], dtype=torch.float64))
        return m.mask_prob[:, 0], m.weight[:, 0]

    def masking(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Masking:
        p, a = self.mask_prob_and_velocity(t)
        return Masking(p[:, None].expand(-1, seq_len), a[:, None].expand(-1, seq_len))

    def alpha(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        return (1 - self.mask_prob_and_velocity(t)[0])[:, None].expand(-1, seq_len)

    def polynomial_exponents(self, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        if self.kind != "polynomial":
            raise ValueError(f"objective.estimator=order needs a polynomial-family schedule; {self.kind} is not one "
                             f"(MDLM's order distribution: schedule.kind=polynomial, exponent 1)")
        return torch.full((seq_len,), float(self.exponent), dtype=torch.float64)
