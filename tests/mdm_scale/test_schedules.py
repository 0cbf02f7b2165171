"""Schedules: the forward process and the sampler's reveal probabilities agree, and stay finite at the ends."""

from __future__ import annotations

import math

import pytest
import torch

from mdm_scale.schedules import BlockSchedule, LearnedPositionSchedule, UnivariateSchedule
from mdm_scale.schedules.base import polynomial_masking
from mdm_scale.time_sampling import grid_times, sample_times

SCHEDULES = {
    "loglinear": lambda: UnivariateSchedule("loglinear", eps=0.0),
    "cosine": lambda: UnivariateSchedule("cosine"),
    "polynomial": lambda: UnivariateSchedule("polynomial", exponent=0.5),
    "block4": lambda: BlockSchedule(4),
    "left_to_right": lambda: BlockSchedule(1),
    "learned": lambda: LearnedPositionSchedule(12),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_mask_probability_times_weight_is_the_reveal_density(name):
    """P(masked at t) * weight = -alpha'(t), the density of tau_i, for every schedule; and P(masked) = 1 - alpha
    except for the Rao-Blackwellised single-position blocks, which condition on the active position."""
    schedule, l = SCHEDULES[name](), 12
    t = torch.linspace(0.05, 0.95, 37, dtype=torch.float64) + 0.004  # off the block-slice edges
    m = schedule.masking(t, l)
    if name != "left_to_right":
        assert torch.allclose(m.mask_prob, 1 - schedule.alpha(t, l), atol=1e-12)
    h = 1e-6
    density = -(schedule.alpha(t + h, l) - schedule.alpha(t - h, l)) / (2 * h)
    assert torch.allclose(m.mask_prob * m.weight, density, rtol=1e-5, atol=1e-6)


def test_polynomial_masking_is_finite_at_the_ends_of_time():
    t = torch.tensor([1e-300, 1e-30, 1e-8, 1 - 1e-12, 1.0], dtype=torch.float64)
    m = polynomial_masking(t, torch.tensor([0.25, 1.0, 1.75], dtype=torch.float64))
    for x in (m.mask_prob, m.weight, m.log_mask_prob):
        assert torch.isfinite(x).all()
    assert torch.isfinite(m.log_keep_prob[:-1]).all()  # at t = 1 alpha = 0: log alpha = -inf is exact


def test_block_schedule_reveals_blocks_in_order():
    schedule, l = BlockSchedule(4), 12
    m = schedule.masking(torch.tensor([0.5], dtype=torch.float64), l)  # middle block active
    assert (m.mask_prob[0, :4] == 0).all() and (m.mask_prob[0, 8:] == 1).all()
    assert (m.weight[0, 8:] == 0).all() and (m.weight[0, 4:8] > 0).all()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_reveal_probabilities_compose_to_alpha(name):
    """Revealing t -> s -> 0 step by step leaves a position masked at 0 with probability 0, and the chance of
    still being masked at s equals (1 - alpha(s)) / (1 - alpha(t))."""
    schedule, l = SCHEDULES[name](), 12
    t, s = torch.tensor([0.9], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)
    stay = 1 - schedule.reveal_probability(t, s, l)
    expected = (1 - schedule.alpha(s, l)) / (1 - schedule.alpha(t, l)).clamp_min(1e-12)
    ok = (1 - schedule.alpha(t, l)) > 1e-9
    assert torch.allclose(stay[ok], expected[ok], atol=1e-9)


def test_antithetic_times_are_stratified_and_weights_integrate_to_one():
    g = torch.Generator().manual_seed(0)
    t, w = sample_times(8, generator=g, t_min=0.0, power=1.0)
    assert sorted((t * 8).floor().long().tolist()) == list(range(8)) and (w == 1).all()
    # Importance weights: E_q[f(t) w(t)] = integral f for the heavy-tailed mixture.
    t, w = grid_times(200_000, power=0.2)
    for f, integral in ((lambda x: x, 0.5), (lambda x: x**0.3, 1 / 1.3), (torch.cos, math.sin(1.0))):
        assert (f(t) * w).mean().item() == pytest.approx(integral, rel=2e-3)
    # A wrong weight (forgetting the uniform half of the mixture) is biased: the check above can fail.
    wrong = 1 / (0.2 * t ** (0.2 - 1))
    assert (t * wrong).mean().item() != pytest.approx(0.5, rel=2e-2)


def test_times_stay_between_t_min_and_one():
    g = torch.Generator().manual_seed(0)
    t, _ = sample_times(1000, generator=g, t_min=1e-3)
    assert t.min() >= 1e-3 and t.max() <= 1.0
