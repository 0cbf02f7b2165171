"""Variance reduction stays unbiased (issue 11): P-POTS time proposal, MIRROR mask pairs and both, against the
exact NELBO by enumeration over masks and quadrature over t; a wrong importance weight fails the same test."""

from __future__ import annotations

import math

import pytest
import torch

from mdm_scale.config import ModelConfig, ObjectiveConfig
from mdm_scale.denoiser import Denoiser
from mdm_scale.exact import all_patterns, pattern_nll, quadrature_nelbo
from mdm_scale.objective import apply_noise, mirror_rows, nelbo, training_nelbo, training_noise
from mdm_scale.schedules import LearnedPositionSchedule, UnivariateSchedule
from mdm_scale.time_sampling import TimeSampler

V, L = 3, 4
X0 = torch.tensor([0, 2, 1, 2])


def make_denoiser():
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, init_std=1.0)
    return Denoiser(cfg, vocab_size=V, max_seq_len=L).eval()


def learned_schedule():
    schedule = LearnedPositionSchedule(L)
    with torch.no_grad():
        schedule.position_logits.copy_(torch.tensor([1.5, -1.0, 0.3, -2.0]))
    return schedule


def skewed_sampler(power: float, bins: int = 8) -> TimeSampler:
    """A P-POTS sampler whose statistics put ~30x more proposal mass on the last bin than on the first."""
    sampler = TimeSampler("p_pots", t_min=0.0, power=power, bins=bins)
    sampler.count.fill_(1.0)
    sampler.square_sum.copy_(torch.logspace(0, 3, bins, dtype=torch.float64))
    assert sampler.proposal().max() / sampler.proposal().min() > 10
    return sampler


def estimates(denoiser, schedule, sampler, *, mirror, draws=24, batch=2048, wrong_weight=False, seed=0):
    """Per-draw means of the per-sequence estimator (each draw: `batch` rows, as pairs when mirrored)."""
    g = torch.Generator().manual_seed(seed)
    cfg = ObjectiveConfig(t_min=0.0, mask_pairs="mirror" if mirror else "independent")
    out = []
    with torch.no_grad():
        for _ in range(draws):
            noise = training_noise(batch // 2 if mirror else batch, L, cfg, sampler, g, torch.device("cpu"))
            t_weight = noise.t_weight
            if wrong_weight:  # forget the proposal density: weight c(s) instead of c(s) / q(s)
                t_weight = sampler._dv_ds(sampler.coordinate(noise.t))
            x0 = X0.expand(len(noise.t), -1)
            terms = nelbo(denoiser, schedule, x0, noise.t, t_weight, noise.uniforms, score_function=False)
            out.append(terms.per_sequence.mean().item())
    v = torch.tensor(out, dtype=torch.float64)
    return v.mean().item(), v.std().item() / math.sqrt(len(v))


@pytest.mark.parametrize("kind", ["p_pots", "mirror", "mirror+p_pots"])
@pytest.mark.parametrize("schedule_name", ["mdlm", "mdm_ls"])
def test_variance_reduced_estimators_are_unbiased_and_a_wrong_weight_is_not(dims, kind, schedule_name):
    denoiser = make_denoiser()
    schedule, power = ((UnivariateSchedule("polynomial"), 1.0) if schedule_name == "mdlm"
                       else (learned_schedule(), 0.2))
    with torch.no_grad():
        nll, _ = pattern_nll(denoiser, X0, all_patterns(L))
        exact = quadrature_nelbo(schedule, all_patterns(L), nll).item()
    sampler = skewed_sampler(power) if "p_pots" in kind else TimeSampler("antithetic", t_min=0.0, power=power)
    mean, se = estimates(denoiser, schedule, sampler, mirror="mirror" in kind)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert se < 0.02 * exact  # the check has power
    if "p_pots" in kind:
        wrong, wrong_se = estimates(denoiser, schedule, sampler, mirror="mirror" in kind, wrong_weight=True)
        assert abs(wrong - exact) > 4 * max(se, wrong_se), (wrong, exact)


def test_mirror_pairs_have_complementary_masks(dims):
    """Rows i and i + b share x and t and use uniforms u and 1 - u: at mask rates <= 1/2 no position is masked
    in both rows, at rates >= 1/2 every position is masked in at least one."""
    denoiser, schedule = make_denoiser(), UnivariateSchedule("polynomial")
    cfg = ObjectiveConfig(t_min=0.0, mask_pairs="mirror")
    noise = training_noise(64, L, cfg, TimeSampler("antithetic", t_min=0.0), torch.Generator().manual_seed(0),
                           torch.device("cpu"))
    assert torch.equal(noise.t[:64], noise.t[64:]) and torch.allclose(noise.uniforms[:64] + noise.uniforms[64:],
                                                                       torch.ones(64, L, dtype=torch.float64))
    x0 = mirror_rows(torch.randint(0, V, (64, L)))
    masked = apply_noise(denoiser, schedule, x0, noise.t, noise.t_weight, noise.uniforms).masked
    low, high = noise.t[:64] <= 0.5, noise.t[:64] >= 0.5
    both, either = masked[:64] & masked[64:], masked[:64] | masked[64:]
    assert not both[low].any() and either[high].all()
    assert both[high].any()  # not a degenerate check


def test_p_pots_proposal_is_proportional_to_root_second_moment_and_draws_follow_it():
    sampler = TimeSampler("p_pots", t_min=0.0, power=1.0, bins=4, uniform_mix=0.2, bin_power=1.0)  # bins in t
    assert torch.allclose(sampler.proposal(), torch.full((4,), 0.25, dtype=torch.float64))  # no data yet: uniform
    # Observed g = L c(s) = per_sequence (k = 1, weight 1): 1 in bin 0, 3 in bin 3, 2 in bins 1-2.
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    sampler.observe(t, torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    expected = 0.8 * torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64) / 8 + 0.2 / 4
    assert torch.allclose(sampler.proposal(), expected)
    t, weight = sampler.draw(8000, torch.Generator().manual_seed(0))
    counts = torch.bincount(sampler.bin_of(t), minlength=4).double() / 8000
    assert torch.allclose(counts, expected, atol=1e-3)  # stratified through the inverse CDF
    assert torch.allclose(weight, 1 / (4 * expected[sampler.bin_of(t)]))
    # The statistics decay: an old observation weighs less than a new one.
    sampler.observe(torch.tensor([0.1], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                    torch.ones(1, dtype=torch.float64))
    assert sampler.count[0] == pytest.approx(1 + sampler.decay) and sampler.count[3] == pytest.approx(sampler.decay)


def test_token_statistic_follows_per_token_squares_which_nelbo_reports(dims):
    """p_pots_statistic=token: the proposal is sqrt of the binned sum of squared per-position terms (not of the
    squared sequence loss), and NelboTerms.token_square is that sum, recomputed here from the denoiser's logits."""
    sampler = TimeSampler("p_pots", t_min=0.0, power=1.0, bins=4, uniform_mix=0.2, bin_power=1.0, statistic="token")
    t, ones = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    sampler.observe(t, 5 * ones, ones, torch.tensor([1.0, 4.0, 4.0, 9.0], dtype=torch.float64))
    expected = 0.8 * torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64) / 8 + 0.2 / 4
    assert torch.allclose(sampler.proposal(), expected)  # the per-sequence losses (all 5) would give uniform
    with pytest.raises(ValueError, match="token_square"):
        sampler.observe(t, 5 * ones, ones)
    with pytest.raises(ValueError, match="p_pots_statistic must be one of sequence, token"):
        TimeSampler("p_pots", statistic="gradient")

    denoiser, schedule = make_denoiser(), UnivariateSchedule("polynomial")  # mask iff u < t, weight 1/t
    g = torch.Generator().manual_seed(3)
    x0, t = torch.randint(0, V, (16, L), generator=g), torch.rand(16, generator=g, dtype=torch.float64) * 0.9 + 0.1
    t_weight, uniforms = 1 + torch.rand(16, generator=g, dtype=torch.float64), torch.rand(16, L, generator=g,
                                                                                          dtype=torch.float64)
    with torch.no_grad():
        terms = nelbo(denoiser, schedule, x0, t, t_weight, uniforms, score_function=False)
        masked = uniforms < t[:, None]
        z = torch.where(masked, torch.full_like(x0, denoiser.mask_id), x0)
        logp = denoiser.output_logits(denoiser(z, t.float())).double().log_softmax(-1)
        per_position = masked * (t_weight / t)[:, None] * -logp.gather(-1, x0[..., None])[..., 0]
    assert (masked.sum(1) > 1).any()  # squares of sums differ from sums of squares
    assert torch.allclose(terms.per_sequence.double(), per_position.sum(1), rtol=1e-4, atol=1e-5)
    assert torch.allclose(terms.token_square, per_position.square().sum(1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(terms.token_square, terms.per_sequence.double().square(), rtol=1e-2)


def test_time_sampler_state_round_trips_and_rejects_another_bin_count():
    sampler = skewed_sampler(0.2)
    other = TimeSampler("p_pots", t_min=0.0, power=0.2, bins=8)
    other.load_state_dict(sampler.state_dict())
    assert torch.equal(other.proposal(), sampler.proposal())
    with pytest.raises(ValueError, match="p_pots_bins"):
        TimeSampler("p_pots", bins=4).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="t_sampler must be one of uniform, antithetic, p_pots"):
        TimeSampler("sobol")


def _schedule_gradient(denoiser, schedule, cfg, sampler, *, draws, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(draws):
        x0 = X0.expand(batch, -1)
        terms = training_nelbo(denoiser, schedule, x0, cfg, g, sampler=sampler)
        # loss is per token over every row; the exact function is per sequence.
        grads.append(torch.autograd.grad(terms.loss * L, schedule.position_logits)[0].double())
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / math.sqrt(draws)


@pytest.mark.parametrize("baseline", ["rloo", "time_binned"])
def test_schedule_gradient_stays_unbiased_with_mirror_p_pots_and_either_baseline(dims, baseline):
    """The score-function term with MIRROR pairs must leave a row's partner out of its baseline (their masks are
    dependent); the time-binned baseline comes from earlier steps. Both must match the exact gradient."""
    denoiser, schedule = make_denoiser(), learned_schedule()
    for p in denoiser.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        nll, _ = pattern_nll(denoiser, X0, all_patterns(L))
    exact_value = quadrature_nelbo(schedule, all_patterns(L), nll, points=4000)
    exact = torch.autograd.grad(exact_value, schedule.position_logits)[0].double()
    assert exact.abs().max() > 1e-2
    cfg = ObjectiveConfig(t_min=0.0, time_power=0.2, t_sampler="p_pots", mask_pairs="mirror", p_pots_bins=8,
                          score_baseline=baseline)
    sampler = skewed_sampler(0.2)
    if baseline == "time_binned":  # statistics from "earlier steps": a pass of the estimator at the same model
        sampler.track_statistics = True
        with torch.no_grad():
            warm = training_nelbo(denoiser, schedule, X0.expand(4096, -1), cfg, torch.Generator().manual_seed(9),
                                  sampler=sampler)
        sampler.observe(warm.t, warm.per_sequence, warm.t_weight)
    mean, se = _schedule_gradient(denoiser, schedule, cfg, sampler, draws=24, batch=1024)
    assert ((mean - exact).abs() < 4 * se + 1e-3).all(), (mean, exact, se)


def test_rloo_baseline_leaves_out_the_mirror_partner():
    """A row's baseline must not depend on its own mask or its partner's (rows i and i + b are one pair)."""
    from mdm_scale.objective import leave_one_out_baseline

    reward = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], dtype=torch.float64)  # pairs (0,3) (1,4) (2,5)
    base = leave_one_out_baseline(reward, mirrored=True)
    assert torch.allclose(base, torch.tensor([(2 + 4 + 16 + 32) / 4, (1 + 4 + 8 + 32) / 4, (1 + 2 + 8 + 16) / 4,
                                              (2 + 4 + 16 + 32) / 4, (1 + 4 + 8 + 32) / 4, (1 + 2 + 8 + 16) / 4],
                                             dtype=torch.float64))
    assert torch.allclose(leave_one_out_baseline(reward, mirrored=False), (reward.sum() - reward) / 5)
    with pytest.raises(ValueError, match=">= 2 sequences"):
        leave_one_out_baseline(reward[:2], mirrored=True)
