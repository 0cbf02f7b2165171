"""Fused forward process for polynomial schedules: uniforms, mask decisions, z_t and loss weights in one pass.

For sequence b at time t_b and position i with exponent w_i (the same semantics as
`schedules.base.polynomial_masking` followed by `objective.apply_noise`):

    u_bi      = counter_uniforms(seed, sequence_index_b, l)[i]                      (rng.py)
    masked_bi = u_bi < mask_scale * exp(w_i * log max(t_b, 1e-300))                  (mask prob t^w, in log space)
    z_t[b, i] = mask_id if masked_bi else x0[b, i]
    weight_bi = masked_bi * (w_i / max(t_b, 1e-300)) * t_weight_b                    (A_i(t) times the importance
                                                                                      weight of t; float32)

MDLM's log-linear schedule is w = 1 with mask_scale = 1 - eps (its weight 1/t does not depend on eps); MDM-LS and
LoMDM pass their [l] or [b, l] exponents. Antithetic / importance-sampled times come in through t and t_weight
(`time_sampling.sample_times`), so the kernel supports whatever proposal drew them.

No gradient flows through this function: it returns detached tensors. Learned schedules (MDM-LS, LoMDM) need the
differentiable weights w_i / t and log-probabilities of the mask pattern for their pathwise and score-function
gradients, so they keep `Schedule.masking` in torch for those and can use this kernel (or `counter_uniforms`) only
for the uniforms / decisions; fixed schedules can use it for everything.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mdm_scale.kernels.backend import resolve_backend
from mdm_scale.kernels.rng import counter_uniforms_torch


class MaskedBatch(NamedTuple):
    z_t: Tensor
    """[b, l] int64: mask_id where masked, x0 elsewhere."""
    masked: Tensor
    """[b, l] bool."""
    weight: Tensor
    """[b, l] float32: masked * A_i(t) * t_weight (the per-position NELBO weight; 0 where not masked)."""


def polynomial_masking_torch(x0: Tensor, t: Tensor, t_weight: Tensor, exponents: Tensor, uniforms: Tensor,
                             mask_id: int, mask_scale: float = 1.0) -> MaskedBatch:
    """Reference: the same ops as polynomial_masking + apply_noise + the weight in nelbo_from_features."""
    log_t = t.to(torch.float64).clamp_min(1e-300).log()[:, None]
    w = exponents.to(torch.float64)
    w = w[None, :] if w.dim() == 1 else w
    mask_prob = mask_scale * (w * log_t).exp()
    masked = uniforms < mask_prob
    z_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    a = w / t.to(torch.float64).clamp_min(1e-300)[:, None]
    weight = (a * t_weight.to(torch.float64)[:, None]).to(torch.float32) * masked
    return MaskedBatch(z_t, masked, weight)


def fused_polynomial_masking(x0: Tensor, t: Tensor, t_weight: Tensor, exponents: Tensor, *, mask_id: int,
                             seed: int | None = None, sequence_index: Tensor | None = None,
                             uniforms: Tensor | None = None, mask_scale: float = 1.0,
                             backend: str = "auto") -> MaskedBatch:
    """Mask x0 at times t with the polynomial schedule 1 - alpha_i(t) = mask_scale * t^{w_i}.

    Args:
        x0: [b, l] int64 clean tokens.
        t: [b] times (float64); t_weight: [b] their importance weights.
        exponents: [l] or [b, l] positive exponents w_i (detached; 1 = MDLM).
        mask_id: id written at masked positions.
        seed, sequence_index: the counter RNG's seed and the [b] global indices of the sequences (rng.py).
        uniforms: optional [b, l] float64 uniforms to use instead of the counter RNG (e.g. `draw_noise`'s, which
            keeps the existing noise stream); then seed and sequence_index are not needed.
        mask_scale: constant factor of the mask probability (1 - eps for MDLM's log-linear schedule).
        backend: "auto" | "triton" | "torch". Both draw the same uniforms bit for bit, so the decisions agree
            except where u is within an ulp of t^w (exp/log may differ in the last bit across libraries).

    Returns:
        MaskedBatch(z_t, masked, weight), all detached.
    """
    b, l = x0.shape
    if exponents.dim() not in (1, 2) or exponents.shape[-1] != l or (exponents.dim() == 2 and exponents.shape[0] != b):
        raise ValueError(f"exponents must be [l] or [b, l] = [{b}, {l}], got {tuple(exponents.shape)}")
    if t.shape != (b,) or t_weight.shape != (b,):
        raise ValueError("t and t_weight must be [b]")
    if uniforms is None and (seed is None or sequence_index is None or sequence_index.shape != (b,)):
        raise ValueError("give either uniforms [b, l] or seed and sequence_index [b]")
    if uniforms is not None and uniforms.shape != (b, l):
        raise ValueError(f"uniforms must be [{b}, {l}], got {tuple(uniforms.shape)}")
    exponents = exponents.detach()
    if resolve_backend(backend, x0.device) == "triton":
        from mdm_scale.kernels import _triton

        return MaskedBatch(*_triton.polynomial_masking(x0, t, t_weight, exponents, seed, sequence_index, mask_id,
                                                       mask_scale, uniforms))
    if uniforms is None:
        uniforms = counter_uniforms_torch(seed, sequence_index, l)
    return polynomial_masking_torch(x0, t, t_weight, exponents, uniforms, mask_id, mask_scale)
