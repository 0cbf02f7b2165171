"""`objective=lomdm_paper`, LoMDM as published (docs/objective.md, section 5b): NormSig exponents, the schedulers'
transformer layer, the two-draw score-function estimator (Eq. 8) against the exact lattice, and TP = 2."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mdm_scale.config import ConfigError, ModelConfig, ObjectiveConfig, load_config
from mdm_scale.denoiser import Denoiser
from mdm_scale.exact import state_dependent_nelbo
from mdm_scale.objective import nelbo, training_nelbo, training_noise
from mdm_scale.schedules import LearnedPositionSchedule, build_schedule
from mdm_scale.schedules.lomdm import StateDependentSchedule
from mdm_scale.time_sampling import TimeSampler

V, L = 3, 4
HEADS = ("forward_scheduler", "backward_scheduler")
X0 = torch.tensor([0, 2, 1, 2])


def paper_denoiser(seed=0, vocab=V, seq_len=L):
    """A real (megatron) denoiser whose schedulers are the paper's: one transformer layer + MLP, no position bias;
    large init so predictions differ strongly across contexts."""
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, init_std=1.0, scheduler_head_size=16)
    return Denoiser(cfg, vocab_size=vocab, max_seq_len=seq_len, scheduler_heads=HEADS, scheduler_layers=1,
                    scheduler_position_bias=False).eval()


def paper_objective(**overrides) -> ObjectiveConfig:
    items = [f"objective.{key}={value}" for key, value in overrides.items()]
    return load_config("tiny", ["objective=lomdm_paper", *items]).objective


def test_lomdm_paper_preset_is_the_papers_configuration():
    cfg = paper_objective()
    s = cfg.schedule
    assert (s.kind, s.exponent_family, s.min_exponent, s.exponent_range) == ("lomdm", "normsig", 0.7, 0.65)
    assert (s.scheduler_layers, s.scheduler_position_bias) == (1, False)
    assert (cfg.estimator, cfg.t_sampler, cfg.t_min, cfg.time_power) == ("time", "antithetic", 1e-3, 1.0)
    assert (cfg.score_baseline, cfg.mask_pairs) == ("two_draw", "independent")


@pytest.mark.parametrize("overrides, match", [
    (["objective.schedule.exponent_range=0.7"], "min_exponent \\(c1\\) > exponent_range \\(c2\\)"),
    (["objective.schedule.min_exponent=0.5"], "min_exponent \\(c1\\) > exponent_range \\(c2\\)"),
    (["objective.mask_pairs=mirror"], "mask_pairs=independent"),
    (["objective.score_baseline=nearest"], "rloo, time_binned, two_draw"),
    (["objective.schedule.exponent_family=sigmoid"], "linear, log, normsig"),
])
def test_lomdm_paper_refuses_invalid_settings_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", ["objective=lomdm_paper", *overrides])


def test_two_draw_and_scheduler_layers_need_a_learned_schedule():
    with pytest.raises(ConfigError, match="learned schedules"):
        load_config("tiny", ["objective=mdlm", "objective.score_baseline=two_draw"])
    with pytest.raises(ConfigError, match="scheduler heads"):
        load_config("tiny", ["objective=mdm_ls", "objective.schedule.scheduler_layers=1"])
    assert load_config("tiny", ["objective=mdm_ls", "objective.score_baseline=two_draw"]).objective.score_baseline


def test_normsig_keeps_each_sequences_mean_exponent_at_c1():
    """w_i = c1 + c2 (sigmoid(c_i) - mean_j sigmoid(c_j)), c = v - mean v: every row's mean exponent is c1 (1e-6),
    forward and backward; NormSig_i stays inside (-(1 - 1/L), 1 - 1/L), so c1 > c2 keeps w > 0 even at extreme
    logits; a common shift of the logits changes nothing (the direction Adam drifted into saturation)."""
    c1, c2, l = 0.7, 0.65, 9
    schedule = StateDependentSchedule(c1, c2, "normsig")
    logits = torch.randn(64, l, generator=torch.Generator().manual_seed(0)) * 3
    for w in (schedule.exponents(logits), schedule.backward_exponents(logits)):
        assert torch.allclose(w.double().mean(-1), torch.full((64,), c1, dtype=torch.float64), atol=1e-6, rtol=0)
        assert w.std(-1).min() > 0.05  # the positions do differ
    mdm_ls = LearnedPositionSchedule(l, c1, c2, "normsig")
    with torch.no_grad():
        mdm_ls.position_logits.copy_(logits[0])
    assert mdm_ls.exponents(l).double().mean().item() == pytest.approx(c1, abs=1e-6)
    extreme = torch.full((2, l), -300.0)
    extreme[0, 0] = extreme[1, 1:] = 300.0  # one gate open / one gate closed: NormSig = +-(1 - 1/L)
    w = schedule.exponents(extreme).double()
    assert w[0, 0].item() == pytest.approx(c1 + c2 * (1 - 1 / l), abs=1e-6)
    assert w[1, 0].item() == pytest.approx(c1 - c2 * (1 - 1 / l), abs=1e-6) and (w > 0).all()
    assert (schedule.exponents(torch.zeros(3, l)) == c1).all()  # zero-initialised heads: 1 - t^c1
    torch.testing.assert_close(schedule.exponents(logits + 26.0), schedule.exponents(logits), rtol=0, atol=1e-6)


def test_c1_one_c2_zero_equals_mdlm_on_the_same_draws(dims):
    """(c1, c2) = (1, 0) is MDLM (with its eps = 0): the same t and uniforms give the same NELBO, the velocity term
    is 0, and under training_noise the first draw of every pair is exactly MDLM's noise."""
    denoiser = paper_denoiser()
    with torch.no_grad():  # schedulers far from zero: with c2 = 0 they must not matter
        for name, p in denoiser.scheduler_heads.named_parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    paper = paper_objective(**{"schedule.min_exponent": 1.0, "schedule.exponent_range": 0.0})
    mdlm = load_config("tiny", ["objective=mdlm", "objective.schedule.eps=0"]).objective
    paper_schedule, mdlm_schedule = build_schedule(paper.schedule, L), build_schedule(mdlm.schedule, L)
    x0 = torch.randint(0, V, (64, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        t, t_weight = TimeSampler.from_config(mdlm).draw(64, g)
        u = torch.rand(64, L, generator=g, dtype=torch.float64)
        a = nelbo(denoiser, paper_schedule, x0, t, t_weight, u)
        b = nelbo(denoiser, mdlm_schedule, x0, t, t_weight, u)
        assert a.velocity.item() == 0.0 and a.masked_fraction == b.masked_fraction
        assert a.nelbo.item() == pytest.approx(b.nelbo.item(), rel=1e-6)
        torch.testing.assert_close(a.per_sequence, b.per_sequence, rtol=1e-6, atol=1e-6)
        paired = training_nelbo(denoiser, paper_schedule, x0, paper, torch.Generator().manual_seed(3))
        single = training_nelbo(denoiser, mdlm_schedule, x0, mdlm, torch.Generator().manual_seed(3))
        torch.testing.assert_close(paired.per_sequence[:64], single.per_sequence, rtol=1e-6, atol=1e-6)
        # ...and the comparison can fail: c2 > 0 moves the value.
        moved = nelbo(denoiser, build_schedule(paper_objective().schedule, L), x0, t, t_weight, u)
        assert abs(moved.nelbo.item() - b.nelbo.item()) > 1e-3


def test_two_draw_noise_pairs_each_sequence_at_one_time_with_independent_masks():
    cfg = paper_objective()
    sampler = TimeSampler.from_config(cfg)
    noise = training_noise(8, 16, cfg, sampler, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert noise.two_draw and not noise.mirrored and noise.baseline is None
    assert noise.t.shape == (16,) and torch.equal(noise.t[:8], noise.t[8:])
    assert torch.equal(noise.t_weight[:8], noise.t_weight[8:])
    first, second = noise.uniforms[:8], noise.uniforms[8:]
    assert not torch.allclose(first, second) and not torch.allclose(first, 1 - second)
    x = torch.arange(8)[:, None].expand(8, 3)
    assert torch.equal(noise.rows(x), torch.cat([x, x]))
    # Data parallelism: rank r of 2 holds rows r::2 of the global batch's noise, for both draws.
    ranks = [training_noise(4, 16, cfg, TimeSampler.from_config(cfg), torch.Generator().manual_seed(0),
                            torch.device("cpu"), data_parallel_rank=r, data_parallel_size=2) for r in range(2)]
    for r, part in enumerate(ranks):
        assert torch.equal(part.uniforms[:4], first[r::2]) and torch.equal(part.uniforms[4:], second[r::2])


def _two_draw_setup():
    """Frozen paper denoiser with only the forward scheduler trainable, and the exact NELBO as its function."""
    denoiser = paper_denoiser()
    for p in denoiser.parameters():
        p.requires_grad_(False)
    forward = denoiser.scheduler_heads["forward_scheduler"]
    with torch.no_grad():
        forward.net[-1].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))  # logits ~ +-2
        denoiser.scheduler_heads["backward_scheduler"].net[-1].weight.normal_(
            0, 0.5, generator=torch.Generator().manual_seed(6))
    params = [forward.net[-1].weight, forward.layers[0].mlp.linear_fc2.bias]  # the MLP and the transformer layer
    for p in params:
        p.requires_grad_(True)
    cfg = paper_objective(t_min=0.0, time_power=0.2)  # untruncated NELBO, finite variance for w > 0.2
    schedule = build_schedule(cfg.schedule, L)
    return denoiser, schedule, cfg, params, state_dependent_nelbo(denoiser, schedule, X0)


def _gradient_draws(denoiser, schedule, cfg, params, *, draws, rows=2048):
    """Mean and standard error over `draws` estimates of the per-sequence gradient, `rows` rows each."""
    g = torch.Generator().manual_seed(0)
    sequences = rows // 2 if cfg.score_baseline == "two_draw" else rows  # a pair is two rows: equal rows
    grads = []
    for _ in range(draws):
        terms = training_nelbo(denoiser, schedule, X0.expand(sequences, -1), cfg, g)
        grads.append(torch.cat([x.flatten() for x in torch.autograd.grad(terms.loss * L, params)]).double())
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / math.sqrt(draws)


def test_two_draw_score_estimator_is_unbiased_for_the_exact_gradient(dims):
    """Eq. 8 (each row's baseline its partner's loss: the same x and t, an independent mask) plus the pathwise
    terms through A = w / t in the reconstruction and velocity terms: the mean over draws matches the exact
    gradient of the lattice NELBO (all 2^L masks, quadrature in t; t_min = 0 with the t^0.2 proposal, since a
    t_min > 0 truncates what the exact function integrates) within 4 standard errors, through the scheduler's MLP
    and its transformer layer. Without the score term the same check fails. (Its variance against RLOO is
    bench/variance.py's business: on this one-sequence, L = 4 lattice the mask noise at fixed t dominates, which
    the two-draw baseline doubles, so here its standard error is ~1.9x RLOO's at equal rows.)"""
    denoiser, schedule, cfg, params, exact_fn = _two_draw_setup()
    exact_value = exact_fn()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact_value, params)]).double()
    flat = params[0].data.view(-1)  # the autograd gradient of the exact function is its finite difference
    old = flat[0].item()
    flat[0] = old + 1e-3
    plus, hi = exact_fn().item(), flat[0].item()
    flat[0] = old - 1e-3
    minus, lo = exact_fn().item(), flat[0].item()
    flat[0] = old
    assert (plus - minus) / (hi - lo) == pytest.approx(exact[0].item(), rel=1e-3, abs=5e-5)
    assert exact.abs().max() > 1e-2
    with torch.no_grad():
        w = schedule.exponents(denoiser.scheduler_logits("forward_scheduler", denoiser(X0[None])))
    assert w.min() > 0.3 and w.max() - w.min() > 0.2  # a real spread, inside the finite-variance range

    mean, se = _gradient_draws(denoiser, schedule, cfg, params, draws=12)
    assert ((mean - exact).abs() < 4 * se + 2e-3).all(), (mean - exact, se)
    biased, _ = _gradient_draws(denoiser, schedule, replace(cfg, score_function=False), params, draws=4)
    assert ((biased - exact).abs() > 4 * se + 2e-3).any()


def test_scheduler_layer_sees_only_its_own_document(dims):
    """Packed sequences: with the document mask the schedulers' transformer layer keeps documents apart, as the
    backbone does, so a document's exponents do not depend on its neighbour."""
    from mdm_scale.denoiser import document_attention_mask

    denoiser = paper_denoiser(vocab=50, seq_len=12)
    with torch.no_grad():
        denoiser.scheduler_heads["forward_scheduler"].net[-1].weight.normal_(0, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (1, 12), generator=g)
    other = x.clone()
    other[0, :5] = torch.randint(0, 50, (5,), generator=g)
    mask = document_attention_mask(torch.tensor([[0] * 5 + [1] * 7]))
    with torch.no_grad():
        def logits(tokens, attention_mask):
            return denoiser.scheduler_logits("forward_scheduler", denoiser(tokens, attention_mask=attention_mask),
                                             attention_mask)
        assert torch.allclose(logits(x, mask)[0, 5:], logits(other, mask)[0, 5:], atol=1e-5)
        assert not torch.allclose(logits(x, None)[0, 5:], logits(other, None)[0, 5:], atol=1e-3)


def test_pipeline_step_equals_the_one_stage_step(dims):
    """The pipeline path (megatron's schedule at PP = 1, clean pass on all rows) gives training_nelbo's loss and
    gradients (one clean pass per pair) for lomdm_paper."""
    from mdm_scale.pipeline import pipeline_nelbo

    cfg = load_config("tiny", ["objective=lomdm_paper", "model.num_layers=1", "model.hidden_size=32",
                               "model.num_attention_heads=2", "model.scheduler_head_size=16", "data.seq_len=16",
                               "sampling.num_samples=0"])
    from mdm_scale.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg, 97, dims)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "scheduler_heads" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x0 = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    denoiser, schedule = model["denoiser"], model["schedule"]
    terms = training_nelbo(denoiser, schedule, x0, cfg.objective, torch.Generator().manual_seed(3))
    terms.loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (piped,) = pipeline_nelbo(denoiser, schedule, [x0], cfg.objective, torch.Generator().manual_seed(3))
    assert piped.nelbo.item() == pytest.approx(terms.nelbo.item(), rel=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(reference) and any(".layers.0." in n and "scheduler" in n for n in grads)
    # Gradients that the logits' centring makes nearly cancel (e.g. a scheduler layer's norm bias) are compared
    # to the overall gradient scale, not their own, as in the tensor-parallel tests.
    overall = max(g.abs().max().item() for g in reference.values())
    for name, g_ref in reference.items():
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-5, atol=1e-6 * overall, msg=name)


def test_scheduler_layers_tensor_parallel_match_one_rank():
    """TP = 2 (real gloo ranks) gives TP = 1's loss and full gradients for lomdm_paper on packed documents (the
    document mask reaches the schedulers' layers), and that layer is really split over the two ranks. (Without
    documents, TP = 2 is covered by tests/mdm_scale/test_export.py: a TP = 2 run's schedulers, consolidated,
    reproduce TP = 1's logits.)"""
    from tests.parallel import workers
    from tests.spawn import run_ranks

    objectives = ["lomdm_paper+documents"]
    one = run_ranks(1, workers.nelbo_gradients, objectives, 1)[0]
    two = run_ranks(2, workers.nelbo_gradients, objectives, 2)
    layer = "denoiser.scheduler_heads.forward_scheduler.layers.0.mlp.linear_fc1.weight"
    for objective in objectives:
        ref, tp = one[objective], [rank[objective] for rank in two]
        assert tp[0]["local_shapes"][layer][0] * 2 == ref["local_shapes"][layer][0]  # a real split
        overall = max(g.abs().max().item() for g in ref["grads"].values() if g is not None)
        checked = 0
        for rank in tp:
            assert rank["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            assert rank["nelbo"] == pytest.approx(ref["nelbo"], rel=1e-5)
        for name, g_ref in ref["grads"].items():
            if g_ref is None:
                assert tp[0]["grads"][name] is None, name
                continue
            # fp32 sums in another order: up to 9e-5 of a tensor's largest entry on an AVX-512 AMD EPYC (the
            # schedulers' first layers, whose gradients sum over every position); a TP bug is off by O(1)
            tolerance = 2e-4 * g_ref.abs().max().item() + 1e-7 * overall
            assert (tp[0]["grads"][name] - g_ref).abs().max().item() <= tolerance, (objective, name)
            assert torch.equal(tp[1]["grads"][name], tp[0]["grads"][name]), (objective, name)
            checked += ".layers.0." in name and "scheduler_heads" in name and g_ref.abs().max() > 0
        assert checked >= 20, objective  # both schedulers' layers carry gradients
