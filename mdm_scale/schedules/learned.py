"""MDM(LS): learned state-independent per-position exponents, alpha_i(t) = 1 - t^{w_i} (Garg et al.)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdm_scale.schedules.base import (
    Masking,
    Schedule,
    normalized_exponents,
    polynomial_masking,
    polynomial_reveal_probability,
)


class LearnedPositionSchedule(Schedule):
    """w_i from one free logit v_i per position (zero-initialised: MDLM's w = 1), `normalized_exponents`.

    Args:
        max_seq_len: number of position logits; sequences may be shorter (the first l are used).
        min_exponent, exponent_range: c1 and c2 of the linear family, w_i = c1 + c2 * NormSig(v)_i.
        family: linear | log (log w_i = R tanh(centred v_i / R), sharp orders; needs the order estimator) |
            normsig (the LoMDM paper's c1 + c2 * (sigmoid(v_i) - mean_j sigmoid(v_j)), mean exponent c1).
        max_log_exponent: R of the log family.
    """

    learned = True

    def __init__(self, max_seq_len: int, min_exponent: float = 0.25, exponent_range: float = 1.5,
                 family: str = "linear", max_log_exponent: float = 12.0):
        super().__init__()
        self.position_logits = nn.Parameter(torch.zeros(max_seq_len))
        self.min_exponent, self.exponent_range = min_exponent, exponent_range
        self.family, self.max_log_exponent = family, max_log_exponent
        normalized_exponents(self.position_logits[:1], min_exponent, exponent_range, family)  # checks the name

    def exponents(self, seq_len: int) -> Tensor:
        """[l] current exponents."""
        return normalized_exponents(self.position_logits[:seq_len], self.min_exponent, self.exponent_range,
                                    self.family, self.max_log_exponent)

    def polynomial_exponents(self, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        return self.exponents(seq_len)

    def masking(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Masking:
        m = polynomial_masking(t, self.exponents(seq_len))
        m.exponents = m.exponents.expand(t.shape[0], -1)
        return m

    def alpha(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        return 1 - polynomial_masking(t, self.exponents(seq_len)).mask_prob

    def reveal_probability(self, t, s, seq_len, scheduler_logits=None):
        return polynomial_reveal_probability(t, s, self.exponents(seq_len))
