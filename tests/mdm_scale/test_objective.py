"""Exactness of the NELBO estimator against enumeration (MISSION.md's checkable claims, issue 2 (a)-(f))."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mdm_scale.exact import (
    all_patterns,
    best_order,
    fixed_order_nelbo,
    order_likelihood,
    order_nelbo,
    order_probabilities,
    pattern_nll,
    plackett_luce_nelbo,
    quadrature_nelbo,
    state_dependent_nelbo,
)
from mdm_scale.objective import nelbo, velocity_matching
from mdm_scale.schedules import BlockSchedule, LearnedPositionSchedule, UnivariateSchedule
from mdm_scale.schedules.lomdm import StateDependentSchedule
from mdm_scale.time_sampling import grid_times, sample_times
from tests.mdm_scale.enumerable import L, V, learned_schedule, make_denoiser, monte_carlo


@pytest.mark.parametrize("reverse", [False, True])
def test_left_to_right_schedule_equals_causal_nll(dims, reverse):
    vocab, l = 50, 8
    denoiser = make_denoiser(vocab, l, std=0.5)
    x0 = torch.randint(0, vocab, (l,), generator=torch.Generator().manual_seed(1))
    schedule = BlockSchedule(1, reverse=reverse)
    t, tw = grid_times(l)  # one time in each position's slice
    with torch.no_grad():
        terms = nelbo(denoiser, schedule, x0.expand(l, -1), t, tw, torch.rand(l, l, dtype=torch.float64))
        diffusion = terms.per_sequence.mean().item()
        # The same network evaluated autoregressively: x^{<i} visible, i and later masked.
        ar = 0.0
        order = range(l - 1, -1, -1) if reverse else range(l)
        for k, i in enumerate(order):
            visible = torch.tensor([j in list(order)[:k] for j in range(l)])
            z = torch.where(visible, x0, torch.full_like(x0, denoiser.mask_id))
            ar += denoiser.token_nll(denoiser.output_logits(denoiser(z[None])[0, i : i + 1]), x0[i : i + 1]).item()
    assert diffusion == pytest.approx(ar, rel=1e-5)
    # ...and a random-order schedule does not give the same number (the check can fail).
    with torch.no_grad():
        mdlm = nelbo(denoiser, UnivariateSchedule("polynomial"), x0.expand(l, -1), t, tw,
                     torch.rand(l, l, dtype=torch.float64)).per_sequence.mean().item()
    assert abs(mdlm - ar) > 1e-2


def test_monte_carlo_nelbo_matches_order_enumeration(dims):
    """Prop. 3.1: the t-form estimator's mean equals sum over orders of AR losses, P(order) Plackett-Luce."""
    denoiser, schedule = make_denoiser(), learned_schedule()
    x0 = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        nll, _ = pattern_nll(denoiser, x0, all_patterns(L))
        exact = order_nelbo(order_probabilities(schedule.exponents(L)), nll)
        quadrature = quadrature_nelbo(schedule, all_patterns(L), nll).item()
    assert quadrature == pytest.approx(exact, rel=1e-6)  # two exact routes agree
    mean, se = monte_carlo(denoiser, schedule, x0, draws=16)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    # Uniform orders give a measurably different value: the test distinguishes schedules.
    uniform = order_nelbo(order_probabilities(torch.ones(L)), nll)
    assert abs(uniform - exact) > 4 * se


def test_univariate_schedules_give_same_nelbo_for_time_independent_model(dims):
    denoiser = make_denoiser()
    x0 = torch.tensor([1, 0, 2, 2])
    with torch.no_grad():
        nll, _ = pattern_nll(denoiser, x0, all_patterns(L))
    random_order = order_nelbo(order_probabilities(torch.ones(L)), nll)
    for kind in ("loglinear", "cosine", "polynomial"):
        schedule = UnivariateSchedule(kind, eps=0.0, exponent=2.0)
        assert quadrature_nelbo(schedule, all_patterns(L), nll).item() == pytest.approx(random_order, rel=1e-6)
        mean, se = monte_carlo(denoiser, schedule, x0, power=0.5, seed=hash(kind) % 1000)
        assert abs(mean - random_order) < 4 * se, (kind, mean, se, random_order)


def test_velocity_matching_is_nonnegative_and_zero_only_at_agreement():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(10_000, generator=g, dtype=torch.float64) * 10 + 1e-3
    a_hat = torch.rand(10_000, generator=g, dtype=torch.float64) * 10 + 1e-3
    assert (velocity_matching(a, a_hat) >= 0).all()
    assert (velocity_matching(a, a) == 0).all()
    assert (velocity_matching(a, a * 1.01) > 0).all()


def test_lomdm_velocity_term_vanishes_at_init_and_grows_when_heads_disagree(dims):
    denoiser = make_denoiser(heads=("forward_scheduler", "backward_scheduler"))
    schedule = StateDependentSchedule()
    x0 = torch.tensor([[0, 2, 1, 2]]).expand(64, -1)
    g = torch.Generator().manual_seed(0)
    t, tw = sample_times(64, generator=g, t_min=0.0, power=0.2)
    u = torch.rand(64, L, generator=g, dtype=torch.float64)
    with torch.no_grad():
        assert nelbo(denoiser, schedule, x0, t, tw, u).velocity.item() == 0.0
        torch.nn.init.normal_(denoiser.scheduler_heads["backward_scheduler"].net[-1].weight, std=1.0)
        assert nelbo(denoiser, schedule, x0, t, tw, u).velocity.item() > 0.0


def test_nelbo_upper_bounds_exact_nll_of_enumerable_model(dims):
    """NELBO(x) >= -log p_model(x) for every x in V^L, where p_model (the exact sampler's law) sums to 1."""
    l = 3
    denoiser, schedule = make_denoiser(seq_len=l), LearnedPositionSchedule(l)
    with torch.no_grad():
        schedule.position_logits.copy_(torch.tensor([1.5, -1.0, 0.3]))
        probs = order_probabilities(schedule.exponents(l))
        total_p, gaps = 0.0, []
        for x in torch.cartesian_prod(*[torch.arange(V)] * l):
            nll, _ = pattern_nll(denoiser, x, all_patterns(l))
            bound = quadrature_nelbo(schedule, all_patterns(l), nll).item()
            p = order_likelihood(probs, nll)
            total_p += p
            gaps.append(bound + math.log(p))
    assert total_p == pytest.approx(1.0, abs=1e-6)
    assert min(gaps) >= -1e-9
    assert max(gaps) > 1e-3  # Jensen's gap is real for a model whose conditionals depend on the order


def _exact_and_estimated_gradient(denoiser, schedule, x0, params, exact_fn, *, score_function=True, draws=16):
    exact = exact_fn()
    exact_grad = torch.autograd.grad(exact, params)[0].flatten()
    # Central finite differences of the exact NELBO confirm the autograd gradient of the exact function.
    flat = params.data.view(-1)
    for j in range(min(3, flat.numel())):
        old = flat[j].item()
        flat[j] = old + 1e-3
        plus, hi = exact_fn().item(), flat[j].item()  # the step actually stored in the fp32 parameter
        flat[j] = old - 1e-3
        minus, lo = exact_fn().item(), flat[j].item()
        flat[j] = old
        assert (plus - minus) / (hi - lo) == pytest.approx(exact_grad[j].item(), rel=1e-3, abs=5e-5)  # fp32 network
    g = torch.Generator().manual_seed(0)
    grads = []
    batch = 2048
    for _ in range(draws):
        t, tw = sample_times(batch, generator=g, t_min=0.0, power=0.2)
        u = torch.rand(batch, x0.shape[0], generator=g, dtype=torch.float64)
        terms = nelbo(denoiser, schedule, x0.expand(batch, -1), t, tw, u, score_function=score_function)
        # loss is per token; the exact function is per sequence.
        grads.append(torch.autograd.grad(terms.loss * x0.shape[0], params)[0].flatten().double())
    grads = torch.stack(grads)
    return exact_grad.double(), grads.mean(0), grads.std(0) / math.sqrt(draws)


def test_mdm_ls_schedule_gradient_matches_finite_differences(dims):
    denoiser, schedule = make_denoiser(), learned_schedule()
    for p in denoiser.parameters():
        p.requires_grad_(False)
    x0 = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        nll, _ = pattern_nll(denoiser, x0, all_patterns(L))
    params = schedule.position_logits
    exact = lambda: quadrature_nelbo(schedule, all_patterns(L), nll, points=4000)  # noqa: E731
    exact_grad, mean, se = _exact_and_estimated_gradient(denoiser, schedule, x0, params, exact)
    assert exact_grad.abs().max() > 1e-2
    assert ((mean - exact_grad).abs() < 4 * se + 1e-3).all(), (mean, exact_grad, se)
    # Without the score-function term the estimator is biased: the same check fails.
    _, biased, _ = _exact_and_estimated_gradient(denoiser, schedule, x0, params, exact, score_function=False)
    assert ((biased - exact_grad).abs() > 4 * se + 1e-3).any()


def test_lomdm_forward_scheduler_gradient_matches_finite_differences(dims):
    heads = ("forward_scheduler", "backward_scheduler")
    denoiser, schedule = make_denoiser(heads=heads), StateDependentSchedule()
    for p in denoiser.parameters():
        p.requires_grad_(False)
    fwd = denoiser.scheduler_heads["forward_scheduler"].net[-1]
    with torch.no_grad():
        fwd.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
        denoiser.scheduler_heads["backward_scheduler"].net[-1].weight.normal_(0, 0.5)
    fwd.weight.requires_grad_(True)
    x0 = torch.tensor([0, 2, 1, 2])
    exact = state_dependent_nelbo(denoiser, schedule, x0)
    exact_grad, mean, se = _exact_and_estimated_gradient(denoiser, schedule, x0, fwd.weight, exact, draws=12)
    assert exact_grad.abs().max() > 1e-2
    assert ((mean - exact_grad).abs() < 4 * se + 2e-3).all(), (mean - exact_grad, se)


def test_document_mask_makes_packed_documents_independent(dims):
    from mdm_scale.denoiser import document_attention_mask

    denoiser = make_denoiser(vocab=50, seq_len=12, std=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (1, 12), generator=g)
    mask = document_attention_mask(torch.tensor([[0] * 5 + [1] * 7]))
    other = x.clone()
    other[0, :5] = torch.randint(0, 50, (5,), generator=g)  # a different first document
    with torch.no_grad():
        packed, changed = denoiser(x, attention_mask=mask), denoiser(other, attention_mask=mask)
        alone = denoiser(x[:, 5:])  # the second document by itself (rotary attention is relative)
        unmasked = denoiser(other)
    assert torch.allclose(packed[0, 5:], changed[0, 5:], atol=1e-6)
    assert torch.allclose(packed[0, 5:], alone[0], atol=1e-5)
    assert not torch.allclose(packed[0, 5:], unmasked[0, 5:], atol=1e-3)  # without the mask it leaks


def test_packed_row_nelbo_is_the_sum_of_its_documents_alone_and_padding_carries_nothing(dims):
    """Document ids (`--pack documents`): attention stays inside a document, so at the same t and the same
    per-position uniforms the packed row's per-sequence NELBO is exactly the sum of its documents evaluated as
    separate rows; padding adds nothing (whatever its tokens) and is not counted as tokens."""
    from data_pipeline.shard_format import PADDING_DOCUMENT_ID

    vocab = 50
    denoiser = make_denoiser(vocab=vocab, seq_len=12, std=0.5)
    schedule = UnivariateSchedule("loglinear")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (1, 12), generator=g)
    ids = torch.tensor([[0] * 4 + [1] * 6 + [PADDING_DOCUMENT_ID] * 2])
    t, tw = torch.tensor([0.7], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    u = torch.rand(1, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        packed = nelbo(denoiser, schedule, x, t, tw, u, document_ids=ids)
        first = nelbo(denoiser, schedule, x[:, :4], t, tw, u[:, :4])
        second = nelbo(denoiser, schedule, x[:, 4:10], t, tw, u[:, 4:10])
        repadded = x.clone()
        repadded[0, 10:] = (x[0, 10:] + 1) % vocab
        other_padding = nelbo(denoiser, schedule, repadded, t, tw, u, document_ids=ids)
        unmasked = nelbo(denoiser, schedule, x, t, tw, u)
    assert packed.masked_fraction > 0 and (u[0, 10:] < 0.7).any()  # some padding is masked too
    expected = first.per_sequence + second.per_sequence
    assert torch.allclose(packed.per_sequence, expected, rtol=1e-5), (packed.per_sequence, expected)
    assert torch.allclose(packed.nelbo, expected.sum() / 10, rtol=1e-5)  # 10 data tokens, not 12
    assert torch.equal(other_padding.per_sequence, packed.per_sequence)
    assert not torch.allclose(unmasked.per_sequence, expected, rtol=1e-3)  # without the ids, documents leak


def test_plackett_luce_dynamic_program_matches_order_enumeration(dims):
    """The O(2^l l) routines in mdm_scale.exact agree with the l! enumeration (orders and best order)."""
    denoiser = make_denoiser()
    x0 = torch.tensor([2, 0, 1, 1])
    with torch.no_grad():
        nll, _ = pattern_nll(denoiser, x0, all_patterns(L))
    w = learned_schedule().exponents(L)
    exact = order_nelbo(order_probabilities(w), nll)
    assert plackett_luce_nelbo(w, nll).item() == pytest.approx(exact, rel=1e-12)
    assert plackett_luce_nelbo(torch.ones(L), nll).item() != pytest.approx(exact, rel=1e-3)
    orders = {perm: fixed_order_nelbo(perm, nll) for perm in itertools.permutations(range(L))}
    order, value = best_order(nll)
    assert value == pytest.approx(min(orders.values()), rel=1e-12) and orders[order] == pytest.approx(value)
    # A near-deterministic PL (w spread by e^8 per rank) reproduces that order's value.
    sharp = torch.zeros(L, dtype=torch.float64)
    sharp[list(order)] = torch.arange(L, 0, -1, dtype=torch.float64) * 8
    assert plackett_luce_nelbo(sharp.exp(), nll).item() == pytest.approx(value, rel=1e-3)
    # Differentiable: the gradient matches a finite difference.
    log_w = w.detach().double().log().requires_grad_()
    plackett_luce_nelbo(log_w.exp(), nll).backward()
    step = torch.zeros(L, dtype=torch.float64)
    step[1] = 1e-6
    fd = (plackett_luce_nelbo((log_w + step).exp(), nll) - plackett_luce_nelbo((log_w - step).exp(), nll)) / 2e-6
    assert log_w.grad[1].item() == pytest.approx(fd.item(), rel=1e-5)


@pytest.mark.parametrize("case, match", [
    ("token_at_vocab", r"token ids must be in \[0, 3\)"),
    ("mask_token", r"token ids must be in \[0, 3\)"),
    ("negative_token", r"token ids must be in \[0, 3\)"),
    ("t_above_one", r"times must be in \(0, 1\]"),
    ("t_zero", r"times must be in \(0, 1\]"),
    ("t_nan", r"times must be in \(0, 1\]"),
    ("empty", "non-empty"),
])
def test_nelbo_refuses_inputs_that_would_give_a_wrong_number(dims, case, match):
    from mdm_scale.objective import BatchError

    denoiser, schedule = make_denoiser(), UnivariateSchedule("loglinear")
    x0, t = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]]), torch.tensor([0.5, 0.9], dtype=torch.float64)
    if case in ("token_at_vocab", "mask_token"):
        x0[1, 2] = V  # V is both "one past the vocabulary" and the mask id
    if case == "negative_token":
        x0[0, 0] = -1
    if case.startswith("t_"):
        t[1] = {"t_above_one": 1.5, "t_zero": 0.0, "t_nan": float("nan")}[case]
    if case == "empty":
        x0, t = x0[:0], t[:0]
    u = torch.rand(x0.shape, dtype=torch.float64)
    with pytest.raises(BatchError, match=match):
        nelbo(denoiser, schedule, x0, t, torch.ones_like(t), u)
