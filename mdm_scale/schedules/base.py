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

from mdm_scale.config import EXPONENT_FAMILIES


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
    masked: Tensor | None = None
    """[b, l] bool: the pattern itself, when the masking draws it (the order form); None = draw
    z_t^i = m iff u_i < mask_prob_i."""
    time: Tensor | None = None
    """[b] the time the denoiser sees when the masking draws it (the order form); None = the sampled t."""
    log_prob: Tensor | None = None
    """[b] differentiable log-probability of the drawn pattern's generation prefix (the order form's
    score-function variable); None = sum_i log q(z_t^i) from log_mask_prob / log_keep_prob."""
    rate_scale: Tensor | None = None
    """[b, 1] factor that turns w_i into position i's weight (the order form: L / W(M)); None = 1/t, i.e.
    A_i = w_i / t. The velocity-matching term uses the same factor."""


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

    def polynomial_exponents(self, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        """[l] or [b, l] exponents w_i of a polynomial-family schedule, alpha_i(t) = 1 - t^{w_i} (the order form
        of the estimator needs them)."""
        raise ValueError(f"objective.estimator=order needs a polynomial-family schedule (schedule.kind = "
                         f"polynomial | mdm_ls | lomdm), not {type(self).__name__}")

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




def normalized_exponents(logits: Tensor, min_exponent: float, exponent_range: float, family: str = "linear",
                         max_log_exponent: float = 12.0) -> Tensor:
    """Exponents from free logits v (over the last dim), centred: c = v - mean_j v_j.

    linear: w_i = c1 + c2 * sigmoid(c_i); w = c1 + c2/2 at v = 0, which is MDLM's w = 1 for the default
    c1 = 0.25, c2 = 1.5. Bounded away from 0, as the time form's variance needs (w > time_power).
    log: log w_i = R tanh(c_i / R), R = max_log_exponent; w = 1 at v = 0. Ratios up to e^(2R): sharp orders
    (P(i before j) = w_i / (w_i + w_j)); only the order form can train it (docs/objective.md, section 4c).
    normsig (the LoMDM paper's): w_i = c1 + c2 * NormSig(v)_i, NormSig(v)_i = sigmoid(v_i) - mean_j sigmoid(v_j):
    the mean exponent of every sequence is c1 (w = c1 at v = 0); NormSig_i lies in (-(1 - 1/L), 1 - 1/L), so
    c1 > c2 keeps every w_i > 0. The sigmoids are centred (the paper's NormSig) and, before them, the logits too.

    Centring the logits removes the one direction that only rescales time for every position at once (linear,
    log). For normsig it removes a direction the paper's NormSig does not see at v = 0 but that Adam drifts once
    the logits differ: on char_lm every logit reached ~ +26 within 150 steps, all sigmoids saturated, w = c1
    everywhere and the scheduler's gradient vanished for good (docs/objective.md 5b, docs/results.md).
    """
    if family == "normsig":  # float64: the two centrings cancel most of each value, float32 would keep ~1e-5
        v = logits.double()
        gates = torch.sigmoid(v - v.mean(dim=-1, keepdim=True))
        return (min_exponent + exponent_range * (gates - gates.mean(dim=-1, keepdim=True))).to(logits.dtype)
    centred = logits - logits.mean(dim=-1, keepdim=True)
    if family == "log":
        return torch.exp(max_log_exponent * torch.tanh(centred / max_log_exponent))
    if family != "linear":
        raise ValueError(f"schedule.exponent_family must be one of {', '.join(EXPONENT_FAMILIES)}, got {family!r}")
    return min_exponent + exponent_range * torch.sigmoid(centred)


def order_masking(exponents: Tensor, progress: Tensor, uniforms: Tensor) -> Masking:
    """The order (reveal-time) form of the polynomial family: one step of the generation order per sequence
    (docs/objective.md, section 4c).

    -log tau_i ~ Exp(w_i), so the order is an exponential race: sort e_i = -log(u_i) / w_i (first revealed
    first). With k = ceil(progress * L) - 1 positions revealed, M = the other L - k are masked and the next one is
    i in M with probability w_i / W(M), W(M) = sum_{j in M} w_j, whatever the time. Rao-Blackwellising that
    choice, L * sum_{i in M} (w_i / W(M)) * NLL_i is unbiased for the NELBO when progress ~ U(0, 1]: weights
    L w_i / W(M) <= L, for any w (no 1/t). The denoiser sees t = the time of the next reveal,
    -log t = sum_{r <= k} E_r / W(M_r), with the race's spacings E_r (i.i.d. Exp(1), independent of the order)
    held fixed: gradients reach w pathwise through W(M_r) and, through `log_prob` = log P(first k of the order),
    by the score function.

    Args:
        exponents: [l] or [b, l] positive w_i (may carry gradients).
        progress: [b] float64 in (0, 1]: the step, k = ceil(progress * L) - 1.
        uniforms: [b, l] float64 in (0, 1): the race (the same uniforms the time form masks with).
    """
    b, l = uniforms.shape
    w = exponents.to(torch.float64).expand(b, l)
    arrival = -uniforms.clamp_min(1e-300).log() / w.detach()  # [b, l] -log tau_i
    order = arrival.argsort(dim=-1)  # [b, l] positions, first revealed first
    steps = torch.arange(l, device=w.device)
    rank = torch.empty_like(order).scatter_(1, order, steps.expand(b, l))  # [b, l] step at which i is revealed
    k = ((progress.to(torch.float64) * l).ceil().long() - 1).clamp(0, l - 1)  # [b] positions already revealed
    masked = rank >= k[:, None]  # [b, l]
    w_order = w.gather(1, order)  # [b, l] exponents in generation order
    remaining = w_order.flip(-1).cumsum(-1).flip(-1)  # [b, l] W(M_r): exponents not yet revealed before step r
    before = steps[None, :] < k[:, None]  # [b, l] steps already taken
    log_prob = ((w_order.log() - remaining.log()) * before).sum(-1)  # [b] log P(pi_1..pi_k)
    arrival_order = arrival.gather(1, order)  # [b, l] increasing
    spacing = torch.diff(arrival_order, dim=-1, prepend=torch.zeros(b, 1, dtype=torch.float64, device=w.device))
    spacing = (spacing * remaining.detach()).clamp_min(0)  # E_r ~ Exp(1), i.i.d., independent of the order
    log_t = -((spacing / remaining) * (steps[None, :] <= k[:, None])).sum(-1)  # [b], equals -arrival of step k
    scale = l / remaining.gather(1, k[:, None])  # [b, 1] L / W(M)
    return Masking(mask_prob=masked.to(torch.float64), weight=w * scale, exponents=w, masked=masked,
                   time=log_t.exp(), log_prob=log_prob, rate_scale=scale)
