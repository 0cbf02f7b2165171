"""Time samples for the NELBO estimator: antithetic (stratified) u, an optional heavy-tailed proposal, t_min.

With time_power k = 1 this is MDLM's sampler: u_b = (u + b/B) mod 1, t = t_min + (1 - t_min) u, weight 1.

With k < 1 the batch is split (deterministic multiple importance sampling, balance heuristic): half the
sequences draw v uniformly, half from q_k(v) = k v^(k-1) (v = u^(1/k), mass near 0), each group stratified, and
every sample gets the weight

    t_weight = 1 / (f_u * 1 + f_k * k v^(k-1)),        f_u, f_k = fractions of the batch in each group

which keeps the estimator unbiased for (1 - t_min)^-1 * integral_{t_min}^1 of the per-t loss (the NELBO when
t_min = 0). Position i's term has finite variance iff w_i > k (docs/objective.md): learned schedules use k = 0.2
< min w = 0.25, and the uniform half keeps ~half the batch at MDLM's masking rates.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _stratified(n: int, generator: torch.Generator, antithetic: bool) -> Tensor:
    """n uniforms in (0, 1], stratified over [0, 1) when antithetic (MDLM's low-discrepancy sampler)."""
    if antithetic:
        u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n) / max(n, 1)) % 1
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    return 1 - u  # never exactly 0


def _times_and_weights(u_uniform: Tensor, u_power: Tensor, t_min: float, power: float) -> tuple[Tensor, Tensor]:
    n_u, n_p = len(u_uniform), len(u_power)
    log_v = torch.cat([u_uniform.log(), u_power.log() / power])  # [B]
    v = log_v.exp()
    if n_p == 0:
        weight = torch.ones_like(v)
    else:
        density_power = power * torch.exp((power - 1) * log_v)  # k v^(k-1)
        weight = 1 / ((n_u * 1.0 + n_p * density_power) / (n_u + n_p))
    return t_min + (1 - t_min) * v, weight


def sample_times(
    batch_size: int,
    *,
    generator: torch.Generator,
    t_min: float = 1e-3,
    power: float = 1.0,
    antithetic: bool = True,
) -> tuple[Tensor, Tensor]:
    """Draw one time per sequence.

    Args:
        batch_size: B sequences.
        generator: the CPU generator all training randomness comes from (checkpointed).
        t_min: lower end of the time range (MDLM 1e-3; 0 for an untruncated NELBO).
        power: k of the heavy-tailed proposal; 1 = uniform only (MDLM).
        antithetic: stratify each group over [0, 1).

    Returns:
        t [B] float64 in (t_min, 1], t_weight [B] float64 importance weights.
    """
    if not 0 < power <= 1:
        raise ValueError(f"time_power must be in (0, 1], got {power}")
    n_power = batch_size // 2 if power < 1 else 0
    u_uniform = _stratified(batch_size - n_power, generator, antithetic)
    u_power = _stratified(n_power, generator, antithetic) if n_power else u_uniform[:0]
    return _times_and_weights(u_uniform, u_power, t_min, power)


def grid_times(num: int, *, t_min: float = 0.0, power: float = 1.0) -> tuple[Tensor, Tensor]:
    """Midpoint-rule counterpart of `sample_times` (u = (j + 1/2) / n in each group), for deterministic checks."""
    n_power = num // 2 if power < 1 else 0

    def mid(n: int) -> Tensor:
        return (torch.arange(n, dtype=torch.float64) + 0.5) / max(n, 1)

    return _times_and_weights(mid(num - n_power), mid(n_power), t_min, power)
