"""Exact NELBO quantities by enumeration, for tests and studies on tiny vocabularies and lengths.

Everything here uses the production pieces (Denoiser, Schedule.masking) and only replaces Monte Carlo by sums
over all 2^L mask patterns, all L! orders and a fine quadrature over t.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from mdm_scale.denoiser import Denoiser, token_nll
from mdm_scale.objective import velocity_matching


def all_patterns(seq_len: int) -> Tensor:
    """[2^l, l] bool: every mask pattern."""
    return torch.tensor(list(itertools.product([False, True], repeat=seq_len)))


def pattern_nll(denoiser: Denoiser, x0: Tensor, patterns: Tensor) -> tuple[Tensor, Tensor]:
    """For one sequence x0 [l]: NLL of x0^i at every position given each pattern's z, [P, l], and features."""
    z = torch.where(patterns, torch.full_like(patterns, denoiser.mask_id, dtype=torch.long), x0[None, :])
    hidden = denoiser(z)  # [P, l, h]
    nll = token_nll(denoiser.output_logits(hidden.flatten(0, 1)), x0.repeat(len(patterns))).view(patterns.shape)
    return nll, hidden


def quadrature_nelbo(schedule, patterns: Tensor, nll: Tensor, *, scheduler_logits: Tensor | None = None,
                     backward_exponents: Tensor | None = None, points: int = 20000, power: float = 0.1) -> Tensor:
    """Exact NELBO of a time-independent model: sum_p sum_{i in p} nll_p,i * integral q(p | t) A_i(t) dt.

    The integral over t uses t = u^(1/power) and the midpoint rule in u (smooth for exponents > power).
    With `backward_exponents` [P, l] the LoMDM velocity term (1/t)(w log(w / w_hat) - w + w_hat) is added.
    Differentiable with respect to the schedule's parameters.
    """
    l = patterns.shape[1]
    u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    t = u ** (1 / power)
    dt_du = t ** (1 - power) / power  # [T]
    m = schedule.masking(t, l, None if scheduler_logits is None else scheduler_logits.expand(points, -1))
    pat = patterns.to(torch.float64)  # [P, l]
    # log q(p | t) = sum_i p_i log(1 - alpha_i) + (1 - p_i) log alpha_i  -> [T, P]
    log_mask = m.log_mask_prob if m.log_mask_prob is not None else m.mask_prob.clamp_min(1e-300).log()
    log_keep = m.log_keep_prob if m.log_keep_prob is not None else (1 - m.mask_prob).clamp_min(1e-300).log()
    log_q = log_mask @ pat.T + log_keep @ (1 - pat).T
    per_position = m.weight[:, None, :] * nll.to(torch.float64)[None]  # [T, P, l]
    if backward_exponents is not None:
        w = m.exponents[:, None, :]
        vm = velocity_matching(w, backward_exponents.to(torch.float64)[None]) / t[:, None, None]
        per_position = per_position + vm
    integrand = (log_q.exp() * (per_position * pat[None]).sum(-1)).sum(-1)  # [T]
    return (integrand * dt_du).mean()


def order_probabilities(exponents: Tensor) -> dict[tuple[int, ...], float]:
    """Plackett-Luce: with tau_i ~ Beta(w_i, 1), -log tau_i ~ Exp(w_i), so the generation order (decreasing tau)
    is an exponential race: P(pi) = prod_k w_{pi_k} / sum_{j >= k} w_{pi_j}."""
    w = exponents.tolist()
    out = {}
    for perm in itertools.permutations(range(len(w))):
        p, rest = 1.0, sum(w)
        for i in perm:
            p *= w[i] / rest
            rest -= w[i]
        out[perm] = p
    return out


def pattern_index(masked: list[bool]) -> int:
    """Row of `all_patterns` for a mask pattern."""
    return int("".join("1" if m else "0" for m in masked), 2)


def order_nelbo(order_probs: dict, nll: Tensor) -> float:
    """Prop. 3.1: sum_pi P(pi) sum_k -log p(x^{pi_k} | x^{pi_<k})."""
    l = nll.shape[1]
    total = 0.0
    for perm, p in order_probs.items():
        revealed: set[int] = set()
        for i in perm:
            total += p * nll[pattern_index([j not in revealed for j in range(l)]), i].item()
            revealed.add(i)
    return total


def order_likelihood(order_probs: dict, nll: Tensor) -> float:
    """p_model(x) = sum_pi P(pi) prod_k p(x^{pi_k} | x^{pi_<k}): the distribution the exact sampler draws from."""
    l = nll.shape[1]
    total = 0.0
    for perm, p in order_probs.items():
        revealed: set[int] = set()
        log_p = 0.0
        for i in perm:
            log_p -= nll[pattern_index([j not in revealed for j in range(l)]), i].item()
            revealed.add(i)
        total += p * math.exp(log_p)
    return total
