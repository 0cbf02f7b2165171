"""The order form of the NELBO (docs/objective.md 4c): unbiased for the Plackett-Luce NELBO, its velocity term,
its schedule gradient against the exact one, and fixed orders equal to their autoregressive NLL."""

from __future__ import annotations

import math

import pytest
import torch

from mdm_scale.config import ModelConfig
from mdm_scale.denoiser import Denoiser
from mdm_scale.exact import all_patterns, fixed_order_nelbo, pattern_nll, plackett_luce_nelbo, quadrature_nelbo
from mdm_scale.objective import nelbo
from mdm_scale.schedules import BlockSchedule, LearnedPositionSchedule, UnivariateSchedule
from mdm_scale.schedules.lomdm import StateDependentSchedule
from mdm_scale.time_sampling import grid_times, sample_times
from tests.mdm_scale.enumerable import L, V, make_denoiser, monte_carlo


def order_monte_carlo(denoiser, schedule, x0, *, draws=8, batch=4096, seed=0, **kw):
    """Mean and standard error of the order-form estimator (step fraction ~ U(0, 1], antithetic)."""
    g = torch.Generator().manual_seed(seed)
    values = []
    with torch.no_grad():
        for _ in range(draws):
            v, vw = sample_times(batch, generator=g, t_min=0.0, power=1.0)
            u = torch.rand(batch, x0.shape[-1], generator=g, dtype=torch.float64)
            terms = nelbo(denoiser, schedule, x0.expand(batch, -1), v, vw, u, estimator="order", **kw)
            values.append(terms.per_sequence)
    v = torch.cat(values).double()
    return v.mean().item(), v.std().item() / math.sqrt(len(v))


@pytest.mark.parametrize("family,spread", [("linear", 2.0), ("log", 6.0)])
def test_order_estimator_is_unbiased_for_the_plackett_luce_nelbo(dims, family, spread):
    """The order form's mean equals Prop. 3.1's exact value for bounded and for sharp (log-family) exponents,
    where w spans ~e^9 (the time form's weight w / t has infinite variance for w <= time_power there)."""
    denoiser, schedule = make_denoiser(), LearnedPositionSchedule(L, family=family)
    with torch.no_grad():
        schedule.position_logits.copy_(torch.randn(L, generator=torch.Generator().manual_seed(3)) * spread)
        nll, _ = pattern_nll(denoiser, x0 := torch.tensor([0, 2, 1, 2]), all_patterns(L))
        exact = plackett_luce_nelbo(schedule.exponents(L), nll).item()
        uniform = plackett_luce_nelbo(torch.ones(L), nll).item()
    mean, se = order_monte_carlo(denoiser, schedule, x0)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert abs(uniform - exact) > 4 * se  # another order distribution is distinguishable


def test_order_estimator_lomdm_velocity_term_matches_quadrature(dims):
    """LoMDM in the order form: the lattice with each step's velocity cost (1/W(M)) sum phi(w, w_hat) equals
    the time-form quadrature, and the order-form estimator matches it; sharp log-family w as well."""
    heads = ("forward_scheduler", "backward_scheduler")
    denoiser, x0 = make_denoiser(heads=heads), torch.tensor([0, 2, 1, 2])
    for family, std in (("linear", 1.0), ("log", 4.0)):
        schedule = StateDependentSchedule(family=family)
        with torch.no_grad():
            denoiser.scheduler_heads["forward_scheduler"].net[-1].weight.normal_(
                0, std, generator=torch.Generator().manual_seed(5))
            denoiser.scheduler_heads["backward_scheduler"].net[-1].weight.normal_(
                0, 0.5, generator=torch.Generator().manual_seed(6))
            nll, hidden = pattern_nll(denoiser, x0, all_patterns(L))
            w_hat = schedule.backward_exponents(denoiser.scheduler_logits("backward_scheduler", hidden))
            logits = denoiser.scheduler_logits("forward_scheduler", denoiser(x0[None]))
            lattice = plackett_luce_nelbo(schedule.exponents(logits)[0], nll, w_hat).item()
            assert lattice > plackett_luce_nelbo(schedule.exponents(logits)[0], nll).item() + 1e-3  # velocity > 0
            if family == "linear":  # exponents in [0.25, 1.75]: the quadrature is accurate
                quadrature = quadrature_nelbo(schedule, all_patterns(L), nll, scheduler_logits=logits,
                                              backward_exponents=w_hat).item()
                assert lattice == pytest.approx(quadrature, rel=1e-6)
        mean, se = order_monte_carlo(denoiser, schedule, x0)
        assert abs(mean - lattice) < 4 * se, (family, mean, se, lattice)


def test_order_estimator_feeds_the_time_of_the_next_reveal(dims):
    """With a time-conditioned denoiser the order form (t = the next reveal's time) and the time form estimate
    the same NELBO; feeding another time (t = 1 always) gives a different value, so the check can fail."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, init_std=1.0, time_conditioning=True)
    denoiser = Denoiser(cfg, vocab_size=V, max_seq_len=L).eval()
    with torch.no_grad():
        for p in denoiser.time_embedding.parameters():
            p.normal_(0, 1.0)
    schedule, x0 = UnivariateSchedule("polynomial", exponent=1.0), torch.tensor([1, 0, 2, 2])
    order_mean, order_se = order_monte_carlo(denoiser, schedule, x0)
    time_mean, time_se = monte_carlo(denoiser, schedule, x0, power=0.5)
    assert abs(order_mean - time_mean) < 4 * math.hypot(order_se, time_se), (order_mean, time_mean)
    wrong = denoiser.forward

    def at_time_one(z, t=None, *args):
        return wrong(z, torch.ones_like(t), *args)

    denoiser.forward = at_time_one
    try:
        stale, stale_se = order_monte_carlo(denoiser, schedule, x0, draws=4)
    finally:
        denoiser.forward = wrong
    assert abs(stale - time_mean) > 4 * math.hypot(stale_se, time_se)


def _order_gradient(denoiser, schedule, x0, params, *, score_function=True, draws=16, batch=2048):
    g = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(draws):
        v, vw = sample_times(batch, generator=g, t_min=0.0, power=1.0)
        u = torch.rand(batch, x0.shape[0], generator=g, dtype=torch.float64)
        terms = nelbo(denoiser, schedule, x0.expand(batch, -1), v, vw, u, score_function=score_function,
                      estimator="order")
        grads.append(torch.autograd.grad(terms.loss * x0.shape[0], params)[0].flatten().double())
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / math.sqrt(draws)


def test_order_estimator_schedule_gradient_matches_the_exact_gradient(dims):
    """MDM-LS, log family: the order form's gradient (pathwise through L w_i / W(M) plus the score function of the
    revealed prefix, RLOO) matches the exact gradient of the lattice NELBO; without the score term it does not."""
    denoiser, schedule = make_denoiser(), LearnedPositionSchedule(L, family="log")
    for p in denoiser.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        schedule.position_logits.copy_(torch.tensor([1.5, -2.0, 0.5, 3.0]))
        nll, _ = pattern_nll(denoiser, x0 := torch.tensor([0, 2, 1, 2]), all_patterns(L))
    params = schedule.position_logits
    exact = torch.autograd.grad(plackett_luce_nelbo(schedule.exponents(L), nll), params)[0].double()
    assert exact.abs().max() > 1e-2
    mean, se = _order_gradient(denoiser, schedule, x0, params)
    assert ((mean - exact).abs() < 4 * se + 1e-3).all(), (mean, exact, se)
    biased, _ = _order_gradient(denoiser, schedule, x0, params, score_function=False)
    assert ((biased - exact).abs() > 4 * se + 1e-3).any()


def test_fixed_order_schedule_equals_that_orders_autoregressive_nll(dims):
    """kind=fixed_order (any permutation, Rao-Blackwellised like left-to-right): one time per slice gives
    exactly sum_k NLL(x^{pi_k} | x^{pi_<k}); other orders give other values."""
    denoiser, x0 = make_denoiser(), torch.tensor([2, 0, 1, 1])
    with torch.no_grad():
        nll, _ = pattern_nll(denoiser, x0, all_patterns(L))
        t, tw = grid_times(L)
        values = {}
        for order in ([2, 0, 3, 1], [1, 3, 0, 2]):
            terms = nelbo(denoiser, BlockSchedule(1, order=order), x0.expand(L, -1), t, tw,
                          torch.rand(L, L, dtype=torch.float64))
            values[tuple(order)] = terms.per_sequence.mean().item()
            assert values[tuple(order)] == pytest.approx(fixed_order_nelbo(order, nll), rel=1e-5)
    assert abs(values[(2, 0, 3, 1)] - values[(1, 3, 0, 2)]) > 1e-3
    with pytest.raises(ValueError, match="permutation"):
        BlockSchedule(1, order=[0, 0, 1, 2])


def test_plackett_luce_lattice_batches_over_leading_dims(dims):
    denoiser = make_denoiser()
    with torch.no_grad():
        nll = torch.stack([pattern_nll(denoiser, x, all_patterns(L))[0] for x in torch.tensor([[0, 2, 1, 2],
                                                                                                [1, 1, 0, 2]])])
    w = torch.tensor([[1.0, 2.0, 0.5, 3.0], [0.2, 1.0, 4.0, 1.5]], dtype=torch.float64)
    batched = plackett_luce_nelbo(w, nll)
    assert batched.shape == (2,)
    for k in range(2):
        assert batched[k].item() == pytest.approx(plackett_luce_nelbo(w[k], nll[k]).item(), rel=1e-12)


def test_order_estimator_rejects_schedules_without_exponents(dims):
    denoiser, x0 = make_denoiser(), torch.tensor([[0, 2, 1, 2]] * 2)
    v, u = torch.tensor([0.5, 1.0], dtype=torch.float64), torch.rand(2, L, dtype=torch.float64)
    with pytest.raises(ValueError, match="polynomial"):
        nelbo(denoiser, UnivariateSchedule("loglinear"), x0, v, torch.ones(2), u, estimator="order")
    with pytest.raises(ValueError, match="estimator"):
        nelbo(denoiser, UnivariateSchedule("polynomial"), x0, v, torch.ones(2), u, estimator="reveal")
    with pytest.raises(ValueError, match="exponent_family"):
        LearnedPositionSchedule(L, family="exp")
