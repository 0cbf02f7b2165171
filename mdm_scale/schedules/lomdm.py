"""LoMDM: state-dependent exponents w_i(x) from a forward scheduler on clean-x features (arXiv 2602.02112).

w_i(x) from g_phi(f(x)) by one of the exponent families of `normalized_exponents` (the paper's: w_i =
c1 + c2 * NormSig(g_phi(f(x)))_i), alpha_i(t | x) = 1 - t^{w_i}. The logits g_phi(f(x)) come from the
denoiser's forward-scheduler head (it shares the backbone, so it lives in the megatron model; see objective.py
for the passes). At sampling x is unknown: the backward scheduler predicts w_hat_i from (z_t, t) and positions
are revealed with probability 1 - (s/t)^{w_hat_i}; the sampler passes those logits here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdm_scale.schedules.base import (
    Masking,
    Schedule,
    normalized_exponents,
    polynomial_masking,
    polynomial_reveal_probability,
)


class StateDependentSchedule(Schedule):
    learned = True
    needs_clean_features = True

    def __init__(self, min_exponent: float = 0.25, exponent_range: float = 1.5, family: str = "linear",
                 max_log_exponent: float = 12.0):
        super().__init__()
        self.min_exponent, self.exponent_range = min_exponent, exponent_range
        self.family, self.max_log_exponent = family, max_log_exponent
        normalized_exponents(torch.zeros(1), min_exponent, exponent_range, family)  # checks the name

    def exponents(self, scheduler_logits: Tensor) -> Tensor:
        """[b, l] head logits -> [b, l] exponents."""
        if scheduler_logits is None:
            raise ValueError("the LoMDM schedule needs the scheduler head's logits")
        return normalized_exponents(scheduler_logits, self.min_exponent, self.exponent_range, self.family,
                                    self.max_log_exponent)

    def backward_exponents(self, backward_logits: Tensor) -> Tensor:
        """The backward scheduler's w_hat: same range, no centring (it must be able to match any w). The normsig
        family (the paper's) uses the forward form, NormSig included: w_hat has mean c1 over the row too."""
        if self.family == "normsig":
            return normalized_exponents(backward_logits, self.min_exponent, self.exponent_range, self.family)
        if self.family == "log":
            return torch.exp(self.max_log_exponent * torch.tanh(backward_logits / self.max_log_exponent))
        return self.min_exponent + self.exponent_range * torch.sigmoid(backward_logits)

    def polynomial_exponents(self, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        return self.exponents(scheduler_logits)

    def masking(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Masking:
        return polynomial_masking(t, self.exponents(scheduler_logits))

    def alpha(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        return 1 - polynomial_masking(t, self.backward_exponents(scheduler_logits)).mask_prob

    def reveal_probability(self, t, s, seq_len, scheduler_logits=None):
        return polynomial_reveal_probability(t, s, self.backward_exponents(scheduler_logits))
