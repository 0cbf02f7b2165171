"""What every schedule provides: per-position masking probabilities and loss weights at time t.

Notation (docs/objective.md): position i is masked at time t with probability 1 - alpha_i(t); its velocity is
A_i(t) = -alpha_i'(t) / (1 - alpha_i(t)). The NELBO estimator at one t is sum over masked i of weight_i * NLL_i,
where weight_i is A_i(t) (or, for a single-position block, the Rao-Blackwellised reveal density, see block.py).
Times are float64: t can be ~1e-30 under the power-law time proposal, and t^w must not underflow to 0 in log space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Masking:
    """The forward process at one time per sequence."""

    mask_prob: Tensor
    """[b, l] probability that position i is masked, 1 - alpha_i(t)."""
    weight: Tensor
    """[b, l] loss weight of position i when it is masked (A_i(t), 0 where the velocity is 0)."""
    log_mask_prob: Tensor | None = None
    """[b, l] differentiable log(1 - alpha_i(t)); set by learned schedules for the score-function gradient."""
    log_keep_prob: Tensor | None = None
    """[b, l] differentiable log alpha_i(t); set by learned schedules."""
    exponents: Tensor | None = None
    """[b, l] polynomial exponents w_i (learned schedules); the velocity-matching term needs them."""


class Schedule(nn.Module):
    """A per-position noise schedule. Subclasses implement `masking` and `alpha`."""

    learned: bool = False
    """True when the schedule has parameters that need score-function gradients through the masking."""
    needs_clean_features: bool = False
    """True when the schedule depends on the clean sequence (LoMDM's forward scheduler)."""

    def masking(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Masking:
        """Args: t [b] float64 in [0, 1]; seq_len l; scheduler_logits [b, l] (LoMDM only)."""
        raise NotImplementedError

    def alpha(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        """[b, l] probability that position i is still clean at time t (used by the sampler)."""
        raise NotImplementedError

    def reveal_probability(
        self, t: Tensor, s: Tensor, seq_len: int, scheduler_logits: Tensor | None = None
    ) -> Tensor:
        """[b, l] probability that a position masked at t is revealed by s < t:
        (alpha_i(s) - alpha_i(t)) / (1 - alpha_i(t))."""
        a_t = self.alpha(t, seq_len, scheduler_logits)
        a_s = self.alpha(s, seq_len, scheduler_logits)
        return ((a_s - a_t) / (1 - a_t).clamp_min(1e-12)).clamp(0.0, 1.0)


def polynomial_masking(t: Tensor, exponents: Tensor) -> Masking:
    """alpha_i(t) = 1 - t^{w_i}: mask probability t^w, velocity w / t, computed in log space.

    Args:
        t: [b] float64 times in (0, 1].
        exponents: [l] or [b, l] positive exponents w_i (may carry gradients).
    """
    log_t = t.clamp_min(1e-300).log()[:, None]  # [b, 1]
    w = exponents.to(torch.float64)
    if w.dim() == 1:
        w = w[None, :]
    log_mask = w * log_t  # [b, l]
    log_keep = torch.log(-torch.expm1(log_mask).clamp(max=-1e-300))  # log(1 - t^w), stable near t = 1
    weight = w / t[:, None].clamp_min(1e-300)
    return Masking(log_mask.exp(), weight, log_mask, log_keep, w)


def polynomial_reveal_probability(t: Tensor, s: Tensor, exponents: Tensor) -> Tensor:
    """1 - (s / t)^w for the polynomial family, stable for s close to t. Returns [b, l]."""
    w = exponents.to(torch.float64)
    if w.dim() == 1:
        w = w[None, :]
    log_ratio = (s.clamp_min(1e-300).log() - t.clamp_min(1e-300).log())[:, None]
    return -torch.expm1(w * log_ratio)


def normalized_exponents(logits: Tensor, min_exponent: float, exponent_range: float) -> Tensor:
    """w_i = c1 + c2 * NormSig(v)_i with NormSig(v)_i = sigmoid(v_i - mean_j v_j) (over the last dim).

    Centring removes the one direction that only rescales time for every position at once; w = c1 + c2/2 at
    v = 0, which is MDLM's w = 1 for the default c1 = 0.25, c2 = 1.5.
    """
    centred = logits - logits.mean(dim=-1, keepdim=True)
    return min_exponent + exponent_range * torch.sigmoid(centred)
