"""Exact NELBO quantities by enumeration, for tests and studies on tiny vocabularies and lengths.

Everything here uses the production pieces (Denoiser, Schedule.masking) and only replaces Monte Carlo by sums
over all 2^L mask patterns, all L! orders and a fine quadrature over t.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from mdm_scale.denoiser import Denoiser
from mdm_scale.objective import velocity_matching


def all_patterns(seq_len: int) -> Tensor:
    """[2^l, l] bool: every mask pattern."""
    return torch.tensor(list(itertools.product([False, True], repeat=seq_len)))


def pattern_nll(denoiser: Denoiser, x0: Tensor, patterns: Tensor) -> tuple[Tensor, Tensor]:
    """For one sequence x0 [l]: NLL of x0^i at every position given each pattern's z, [P, l], and features."""
    z = torch.where(patterns, torch.full_like(patterns, denoiser.mask_id, dtype=torch.long), x0[None, :])
    hidden = denoiser(z)  # [P, l, h]
    nll = denoiser.token_nll(denoiser.output_logits(hidden.flatten(0, 1)), x0.repeat(len(patterns)))
    nll = nll.view(patterns.shape)
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


def state_dependent_nelbo(denoiser: Denoiser, schedule, x0: Tensor, *, points: int = 4000):
    """For LoMDM on one sequence x0 [l]: a function () -> exact NELBO whose gradient reaches the forward
    scheduler's parameters. The pattern NLLs, the backward exponents and the clean features are fixed (computed
    once here); each call recomputes the forward scheduler's logits, so the gradient of the result is the exact
    one the score-function estimators must be unbiased for."""
    patterns = all_patterns(x0.shape[-1])
    with torch.no_grad():
        nll, hidden = pattern_nll(denoiser, x0, patterns)
        w_hat = schedule.backward_exponents(denoiser.scheduler_logits("backward_scheduler", hidden))
        clean_hidden = denoiser(x0[None])

    def exact() -> Tensor:
        logits = denoiser.scheduler_logits("forward_scheduler", clean_hidden)  # [1, l]
        return quadrature_nelbo(schedule, patterns, nll, scheduler_logits=logits, backward_exponents=w_hat,
                                points=points)

    return exact


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


def plackett_luce_nelbo(exponents: Tensor, nll: Tensor, backward_exponents: Tensor | None = None) -> Tensor:
    """Prop. 3.1 by dynamic programming over the 2^l mask patterns instead of the l! orders; differentiable in
    `exponents` (so an order distribution can be optimised exactly at a fixed denoiser).

    P(the revealed set is R after k steps) is accumulated layer by layer; from pattern p (masked set M) the next
    position is i in M with probability w_i / W(M), W(M) = sum_{j in M} w_j, and costs nll[p, i]. With
    `backward_exponents` (LoMDM's w_hat on every pattern) each step also costs the velocity-matching term over
    the time spent in M, (1 / W(M)) sum_{i in M} (w_i log(w_i / w_hat_i) - w_i + w_hat_i): in s = -log t its
    rate is constant while M lasts, for a mean of 1 / W(M) (docs/objective.md, section 4c).

    Args:
        exponents: [..., l] positive w_i (larger = generated earlier); leading dims batch (e.g. LoMDM's w(x)).
        nll: [..., 2^l, l] per-position NLL under each pattern, rows as in `all_patterns` (or their mean over
            sequences).
        backward_exponents: [..., 2^l, l] w_hat under each pattern, or None (no velocity term).

    Returns the NELBO (nats per sequence), shape of the broadcast leading dims.
    """
    l = nll.shape[-1]
    w = exponents.to(torch.float64)
    nll = nll.to(torch.float64)
    velocity = None
    if backward_exponents is not None:
        velocity = velocity_matching(w[..., None, :], backward_exponents.to(torch.float64))
    bit = [1 << (l - 1 - i) for i in range(l)]  # pattern_index: position 0 is the most significant bit
    batch = torch.broadcast_shapes(w.shape[:-1], nll.shape[:-2])
    reach = {(1 << l) - 1: torch.ones(batch, dtype=torch.float64)}
    total = torch.zeros(batch, dtype=torch.float64)
    for _ in range(l):
        following: dict[int, Tensor] = {}
        for pattern, p in reach.items():
            masked = [i for i in range(l) if pattern & bit[i]]
            w_masked = w[..., masked]
            mass = w_masked.sum(-1)
            step = p[..., None] * w_masked / mass[..., None]  # [..., |M|] probability of revealing i next
            total = total + (step * nll[..., pattern, masked]).sum(-1)
            if velocity is not None:
                total = total + p * velocity[..., pattern, masked].sum(-1) / mass
            for j, i in enumerate(masked):
                following[pattern ^ bit[i]] = following.get(pattern ^ bit[i], 0.0) + step[..., j]
        reach = following
    return total


def fixed_order_nelbo(order, nll: Tensor) -> float:
    """sum_k nll[pattern before step k, order_k] for one generation order (a sequence of positions)."""
    l = nll.shape[1]
    pattern, total = (1 << l) - 1, 0.0
    for i in order:
        total += nll[pattern, i].item()
        pattern ^= 1 << (l - 1 - i)
    return total


def best_order(nll: Tensor) -> tuple[tuple[int, ...], float]:
    """The generation order with the lowest `fixed_order_nelbo` (shortest path through the pattern lattice,
    O(2^l l) instead of l!)."""
    l = nll.shape[1]
    cost = nll.to(torch.float64).tolist()
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}  # from pattern -> (cost to finish, order)
    for pattern in range(1, 1 << l):  # a pattern's successors have fewer set bits, so smaller indices
        best[pattern] = min((cost[pattern][i] + best[pattern ^ (1 << (l - 1 - i))][0],
                             (i,) + best[pattern ^ (1 << (l - 1 - i))][1])
                            for i in range(l) if pattern & (1 << (l - 1 - i)))
    value, order = best[(1 << l) - 1]
    return order, value


def pattern_nll_batch(denoiser: Denoiser, x0: Tensor, patterns: Tensor, *, scheduler_head: str | None = None,
                      rows_per_pass: int = 8192) -> tuple[Tensor, Tensor | None]:
    """`pattern_nll` for many sequences at once: x0 [n, l] -> NLL [n, P, l] and, if `scheduler_head` is named,
    that head's logits on every pattern's features [n, P, l] (LoMDM's backward scheduler)."""
    n, l = x0.shape
    z = torch.where(patterns[None], torch.full((1, 1, 1), denoiser.mask_id, dtype=torch.long), x0[:, None, :])
    z, targets = z.reshape(-1, l), x0[:, None, :].expand(-1, len(patterns), -1).reshape(-1, l)
    nll, head = [], []
    for start in range(0, len(z), rows_per_pass):
        hidden = denoiser(z[start:start + rows_per_pass])  # [r, l, h]
        nll.append(denoiser.token_nll(denoiser.output_logits(hidden.flatten(0, 1)),
                             targets[start:start + rows_per_pass].flatten()).view(-1, l))
        if scheduler_head is not None:
            head.append(denoiser.scheduler_logits(scheduler_head, hidden))
    head_out = torch.cat(head).view(n, len(patterns), l) if head else None
    return torch.cat(nll).view(n, len(patterns), l), head_out
