"""The sampler: Beta time grid, order policies, EB-sampler, remasking; no mask token survives, prompts stay fixed."""

from __future__ import annotations

import math

import pytest
import torch

from mdm_scale.config import ModelConfig
from mdm_scale.denoiser import Denoiser
from mdm_scale.sampling import (
    POLICIES,
    beta_time_grid,
    eb_counts,
    generate,
    reveal_counts,
)
from mdm_scale.schedules import BlockSchedule, LearnedPositionSchedule, UnivariateSchedule
from mdm_scale.schedules.lomdm import StateDependentSchedule

SCHEDULES = [
    (UnivariateSchedule("loglinear"), ()), (BlockSchedule(1), ()), (BlockSchedule(4), ()),
    (LearnedPositionSchedule(16), ()), (StateDependentSchedule(), ("forward_scheduler", "backward_scheduler")),
]
IDS = ["loglinear", "left_to_right", "block4", "mdm_ls", "lomdm"]


def _denoiser(heads=()):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2)
    return Denoiser(cfg, vocab_size=11, max_seq_len=16, scheduler_heads=heads)


def _prompt(b=3, l=16, n=4):
    prompt = torch.full((b, l), -1)
    prompt[:, :n] = torch.tensor([1, 2, 3, 4][:n])
    return prompt


def _count_calls(denoiser):
    calls = []
    denoiser.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _reference_uniform_ancestral(denoiser, schedule, *, num_samples, seq_len, nfe, generator, prompt=None):
    """The sampler before the rework (uniform linspace grid, schedule reveal probabilities), verbatim."""
    denoiser.eval()
    mask_id = denoiser.mask_id
    z = torch.full((num_samples, seq_len), mask_id, dtype=torch.long)
    if prompt is not None:
        z = torch.where(prompt >= 0, prompt, z)
    times = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    with torch.no_grad():
        for k in range(nfe):
            t, s = times[k].expand(num_samples), times[k + 1].expand(num_samples)
            hidden = denoiser(z, t.float())
            backward_logits = None
            if "backward_scheduler" in denoiser.scheduler_heads:
                backward_logits = denoiser.scheduler_logits("backward_scheduler", hidden)
            reveal_prob = schedule.reveal_probability(t, s, seq_len, backward_logits)
            if k == nfe - 1:
                reveal_prob = torch.ones_like(reveal_prob)
            masked = z == mask_id
            uniforms = torch.rand(num_samples, seq_len, generator=generator, dtype=torch.float64)
            reveal = masked & (uniforms < reveal_prob)
            if not reveal.any():
                continue
            logits = denoiser.output_logits(hidden[reveal]).float()
            probs = torch.softmax(logits[:, : denoiser.vocab_size], dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
            z = z.masked_scatter(reveal, tokens)
    return z


def _reference_left_to_right(denoiser, *, num_samples, seq_len, generator, prompt):
    """A plain left-to-right sampler with nfe = number of free positions: one position per call, no remasking."""
    z = torch.where(prompt >= 0, prompt, torch.full_like(prompt, denoiser.mask_id))
    free = (prompt[0] < 0).nonzero()[:, 0].tolist()
    times = torch.linspace(1.0, 0.0, len(free) + 1, dtype=torch.float64)
    with torch.no_grad():
        for k, i in enumerate(free):
            hidden = denoiser(z, times[k].expand(num_samples).float())
            probs = torch.softmax(denoiser.output_logits(hidden[:, i]).float()[:, : denoiser.vocab_size], dim=-1)
            z[:, i] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return z


# ------------------------------------------------------------------------------------------------ time grid


def test_beta_time_grid_matches_closed_forms():
    """t_k = 1 - I_{k/n}(a, b) for Beta laws whose CDF is elementary (the arcsine law for (0.5, 0.5))."""
    closed = {(2.0, 1.0): lambda x: x ** 2, (1.0, 2.0): lambda x: 1 - (1 - x) ** 2, (0.5, 1.0): math.sqrt,
              (2.0, 2.0): lambda x: 3 * x ** 2 - 2 * x ** 3, (1.0, 4.0): lambda x: 1 - (1 - x) ** 4,
              (0.5, 0.5): lambda x: 2 / math.pi * math.asin(math.sqrt(x))}
    for (a, b), f in closed.items():
        grid = beta_time_grid(10, (a, b))
        assert grid.dtype == torch.float64 and grid[0] == 1.0 and grid[-1] == 0.0
        for k in range(11):
            assert grid[k].item() == pytest.approx(1 - f(k / 10), abs=1e-13), (a, b, k)


def test_beta_1_1_grid_gives_exactly_the_uniform_grids_unmasking_probabilities():
    nfe = 7
    old = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    assert torch.equal(beta_time_grid(nfe, (1, 1)), old)
    schedules = [UnivariateSchedule("loglinear"), UnivariateSchedule("cosine"), BlockSchedule(4),
                 LearnedPositionSchedule(16)]
    for schedule in schedules:
        for grid_times, same in ((beta_time_grid(nfe, (1, 1)), True), (beta_time_grid(nfe, (2, 1)), False)):
            new = [schedule.reveal_probability(grid_times[k:k + 1], grid_times[k + 1:k + 2], 16)
                   for k in range(nfe)]
            ref = [schedule.reveal_probability(old[k:k + 1], old[k + 1:k + 2], 16) for k in range(nfe)]
            assert all(torch.equal(n, r) for n, r in zip(new, ref)) is same, (schedule, same)
    grid = beta_time_grid(nfe, (2, 3))
    assert grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    assert torch.allclose(beta_time_grid(4, (2, 1)), 1 - torch.tensor([0, 1, 4, 9, 16], dtype=torch.float64) / 16)


def test_beta_1_1_sampler_reproduces_the_old_uniform_sampler_token_for_token(dims):
    for schedule, heads in SCHEDULES:
        denoiser = _denoiser(heads)
        kwargs = dict(num_samples=3, seq_len=16, nfe=5, prompt=_prompt())
        ref = _reference_uniform_ancestral(denoiser, schedule, generator=torch.Generator().manual_seed(3), **kwargs)
        new = generate(denoiser, schedule, generator=torch.Generator().manual_seed(3), **kwargs).tokens
        assert torch.equal(new, ref)
        other = generate(denoiser, schedule, generator=torch.Generator().manual_seed(3), beta=(3.0, 0.5),
                         **kwargs).tokens
        assert not torch.equal(other, ref)  # another grid, other samples


def test_reveal_counts_follow_the_uniform_schedule_and_sum_to_the_masked_count():
    n = torch.tensor([16, 5, 0, 1])
    times = beta_time_grid(4)
    remaining, total = n.clone(), torch.zeros_like(n)
    for k in range(4):
        c = reveal_counts(remaining, float(times[k]), float(times[k + 1]), k == 3)
        assert ((c >= 1) | (remaining == 0)).all() and (c <= remaining).all()
        if k == 0:
            assert c.tolist() == [4, 1, 0, 1]  # round(16 / 4), round(5 / 4), nothing, at least one
        remaining, total = remaining - c, total + c
    assert torch.equal(total, n) and (remaining == 0).all()


# ------------------------------------------------------------------------------------------------- policies


@pytest.mark.parametrize("schedule,heads", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_returns_no_mask_and_keeps_the_prompt(dims, schedule, heads, policy):
    denoiser = _denoiser(heads)
    prompt = _prompt()
    prompt[1, 10] = 7  # an infilling position
    calls = _count_calls(denoiser)
    out = generate(denoiser, schedule, num_samples=3, seq_len=16, nfe=5, generator=torch.Generator().manual_seed(0),
                   prompt=prompt, policy=policy, eb_gamma=6.0)
    assert out.tokens.shape == (3, 16) and (out.tokens != denoiser.mask_id).all() and (out.tokens < 11).all()
    assert (out.tokens[:, :4] == prompt[:, :4]).all() and out.tokens[1, 10] == 7
    assert out.evaluations == len(calls) and 1 <= out.evaluations <= out.nfe
    if policy != "eb":
        assert out.nfe == 5


def test_left_to_right_schedule_with_nfe_equal_length_reveals_one_position_per_step(dims):
    denoiser = _denoiser()
    revealed = []
    denoiser.register_forward_hook(lambda m, args, out: revealed.append((args[0] != m.mask_id).sum(-1)))
    generate(denoiser, BlockSchedule(1), num_samples=2, seq_len=16, nfe=16,
             generator=torch.Generator().manual_seed(0))
    counts = torch.stack(revealed)[:, 0].tolist()
    assert counts == list(range(16))  # before step k exactly k positions are clean


def test_left_to_right_policy_reveals_positions_in_order(dims):
    denoiser = _denoiser()
    states = []
    denoiser.register_forward_hook(lambda m, args, out: states.append(args[0] != m.mask_id))
    generate(denoiser, UnivariateSchedule(), num_samples=2, seq_len=16, nfe=4, policy="left_to_right",
             generator=torch.Generator().manual_seed(0))
    assert [s[0].sum().item() for s in states] == [0, 4, 8, 12]
    assert all(s[:, : s[0].sum()].all() for s in states)  # a clean prefix


class _Planted(torch.nn.Module):
    """Wraps a denoiser: logits of position `sharp` are peaked (most confident, lowest entropy) and of `flat`
    uniform-ish; every other position has mid-sharp logits."""

    def __init__(self, base, sharp, flat):
        super().__init__()
        self.base, self.sharp, self.flat = base, sharp, flat
        self.mask_id, self.vocab_size, self.scheduler_heads = base.mask_id, base.vocab_size, base.scheduler_heads

    def forward(self, z, t):
        b, l = z.shape
        h = torch.zeros(b, l, 3)
        h[..., 0] = 2.0
        h[:, self.sharp, 0], h[:, self.flat, 0] = 9.0, 0.0
        h[..., 1] = torch.arange(l).float()  # position id, so vocab_logits can tell rows apart
        return h

    def vocab_logits(self, features):
        logits = torch.zeros(features.shape[0], self.vocab_size)
        logits[:, 5] = features[:, 0]
        return logits


@pytest.mark.parametrize("policy", ["confidence", "entropy", "eb"])
def test_confidence_and_entropy_policies_reveal_the_most_certain_position_first(dims, policy):
    planted = _Planted(_denoiser(), sharp=11, flat=2)
    states = []
    planted.register_forward_hook(lambda m, args, out: states.append((args[0] != m.mask_id).clone()))
    out = generate(planted, UnivariateSchedule(), num_samples=2, seq_len=16, nfe=16, policy=policy, eb_gamma=0.0,
                   generator=torch.Generator().manual_seed(0))
    assert states[1].sum(-1).tolist() == [1, 1] and states[1][:, 11].all()  # the sharp position first
    assert states[-1][:, 2].logical_not().all()  # the flat one last
    assert (out.tokens != planted.mask_id).all()


def test_eb_counts_take_the_longest_prefix_within_the_budget():
    proxy = torch.tensor([[0.3, 0.1, 0.2, 5.0], [0.0, 0.0, 9.0, 1.0]], dtype=torch.float64)
    candidates = torch.tensor([[True, True, True, True], [False, True, True, True]])
    # sorted row 0: 0.1, 0.2, 0.3, 5.0; sums of the smaller ones 0, 0.1, 0.3, 0.6
    # sorted row 1 (position 0 is no candidate): 0, 1, 9; sums of the smaller ones 0, 0, 1
    assert eb_counts(proxy, candidates, 0.0).tolist() == [1, 2]  # zero-entropy positions come for free
    assert eb_counts(proxy, candidates, 0.35).tolist() == [3, 2]
    assert eb_counts(proxy, candidates, 1.0).tolist() == [4, 3]  # the max (5.0) is not charged
    assert eb_counts(proxy, candidates, math.inf).tolist() == [4, 3]
    assert eb_counts(proxy, torch.zeros_like(candidates), 1.0).tolist() == [0, 0]


@pytest.mark.parametrize("proxy", ["entropy", "confidence"])
def test_eb_with_gamma_zero_reveals_one_position_per_step_and_gamma_inf_finishes_in_one(dims, proxy):
    denoiser = _denoiser()
    states = []
    denoiser.register_forward_hook(lambda m, args, out: states.append((args[0] != m.mask_id).sum(-1)))
    out = generate(denoiser, UnivariateSchedule(), num_samples=2, seq_len=16, nfe=4, policy="eb", eb_gamma=0.0,
                   eb_proxy=proxy, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 16 and torch.stack(states)[:, 0].tolist() == list(range(16))
    out = generate(denoiser, UnivariateSchedule(), num_samples=2, seq_len=16, nfe=4, policy="eb",
                   eb_gamma=math.inf, eb_proxy=proxy, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 1 and (out.tokens != denoiser.mask_id).all()


# ------------------------------------------------------------------------------------------------ remasking


def test_remask_rate_zero_reproduces_the_plain_sampler_token_for_token(dims):
    schedule, heads = SCHEDULES[4]  # LoMDM: learned backward velocities
    denoiser = _denoiser(heads)
    kwargs = dict(num_samples=3, seq_len=16, nfe=6, prompt=_prompt())
    ref = _reference_uniform_ancestral(denoiser, schedule, generator=torch.Generator().manual_seed(5), **kwargs)
    out = generate(denoiser, schedule, generator=torch.Generator().manual_seed(5), remask_rate=0.0, **kwargs)
    assert torch.equal(out.tokens, ref)
    prompt = _prompt()
    ref = _reference_left_to_right(denoiser, num_samples=3, seq_len=16, generator=torch.Generator().manual_seed(5),
                                   prompt=prompt)
    out = generate(denoiser, schedule, num_samples=3, seq_len=16, nfe=12, prompt=prompt, policy="left_to_right",
                   generator=torch.Generator().manual_seed(5), remask_rate=0.0)
    assert torch.equal(out.tokens, ref)


@pytest.mark.parametrize("schedule,heads", [SCHEDULES[0], SCHEDULES[4]], ids=["loglinear", "lomdm"])
def test_unchanged_inputs_reuse_the_forward_pass_without_changing_samples(dims, schedule, heads):
    """Many grid steps reveal nothing when nfe > length: a denoiser that ignores t gives the same output for the
    same input, so the pass is reused (as MDLM's sampler does) and the samples equal the recomputing sampler's."""
    denoiser = _denoiser(heads)
    kwargs = dict(num_samples=3, seq_len=16, nfe=64, prompt=_prompt())
    calls = _count_calls(denoiser)
    plain = generate(denoiser, schedule, generator=torch.Generator().manual_seed(5), reuse_unchanged=False, **kwargs)
    assert plain.nfe == plain.evaluations == len(calls) > 32  # (it stops early once nothing is masked)
    calls.clear()
    reused = generate(denoiser, schedule, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(reused.tokens, plain.tokens) and reused.nfe == plain.nfe
    assert reused.evaluations == len(calls) < plain.nfe  # counted at the module, not only reported
    assert reused.evaluations >= 12  # each step that revealed something (12 free positions) needs a new pass
    time_conditioned = Denoiser(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                                            time_conditioning=True), vocab_size=11, max_seq_len=16,
                                scheduler_heads=heads)
    calls = _count_calls(time_conditioned)
    out = generate(time_conditioned, schedule, generator=torch.Generator().manual_seed(5), **kwargs)
    assert out.evaluations == out.nfe == len(calls)  # its output depends on t: every step is a new pass


@pytest.mark.parametrize("policy", ["ancestral", "confidence", "eb"])
def test_remasking_changes_the_samples_but_leaves_no_mask_and_keeps_the_prompt(dims, policy):
    denoiser = _denoiser()
    prompt = _prompt()
    masks_seen = []
    denoiser.register_forward_hook(lambda m, args, out: masks_seen.append((args[0] == m.mask_id).sum().item()))
    kwargs = dict(num_samples=3, seq_len=16, nfe=8, prompt=prompt, policy=policy, eb_gamma=0.5)
    plain = generate(denoiser, UnivariateSchedule(), generator=torch.Generator().manual_seed(1), **kwargs)
    plain_masks, masks_seen[:] = list(masks_seen), []
    remasked = generate(denoiser, UnivariateSchedule(), generator=torch.Generator().manual_seed(1),
                        remask_rate=0.3, **kwargs)
    assert not torch.equal(plain.tokens, remasked.tokens)
    assert (remasked.tokens != denoiser.mask_id).all() and (remasked.tokens[:, :4] == prompt[:, :4]).all()
    # remasking puts masks back: later steps see more of them than without
    assert sum(masks_seen[1:]) > sum(plain_masks[1:len(masks_seen)])


def test_nucleus_keeps_the_smallest_top_set_and_renormalises():
    from mdm_scale.sampling import nucleus

    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.97, 0.01, 0.01, 0.01]])
    out = nucleus(probs, 0.7)
    assert torch.allclose(out[0], torch.tensor([0.0, 0.5, 0.0, 0.25]) / 0.75)
    assert torch.equal(out[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(nucleus(probs, 1.0), probs)


def test_generation_builds_no_autograd_graph(dims):
    denoiser = _denoiser()
    grad_enabled = []
    denoiser.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    generate(denoiser, UnivariateSchedule(), num_samples=1, seq_len=16, nfe=2, generator=torch.Generator().manual_seed(0))
    assert grad_enabled and not any(grad_enabled)


def test_every_configurable_policy_has_one_step_function():
    from mdm_scale.config import POLICIES
    from mdm_scale.sampling import ADAPTIVE_POLICIES, POLICY_STEPS

    assert tuple(POLICY_STEPS) == POLICIES and set(ADAPTIVE_POLICIES) <= set(POLICIES)


def test_invalid_options_are_rejected(dims):
    denoiser = _denoiser()
    common = dict(num_samples=1, seq_len=16, nfe=2, generator=torch.Generator().manual_seed(0))
    for bad in ({"policy": "greedy"}, {"eb_proxy": "margin"}, {"remask_rate": 1.0}, {"beta": (0.0, 1.0)}):
        with pytest.raises(ValueError):
            generate(denoiser, UnivariateSchedule(), **common, **bad)


# ------------------------------------------------------------------------------------------ tensor parallel

TP_POLICIES = ("ancestral", "confidence", "eb")


def tp_sample_worker(rank: int, tensor_parallel: int) -> dict:
    """Samples of a LoMDM tiny model (vocabulary split over the TP ranks) for TP_POLICIES, from fixed seeds."""
    from mdm_scale.config import load_config
    from mdm_scale.model import build_model
    from parallel.distributed import init_distributed

    dims = init_distributed(tensor_parallel=tensor_parallel, device="cpu", seed=0)
    cfg = load_config("tiny", ["objective=lomdm", "data.seq_len=16", "model.num_layers=1", "model.hidden_size=32",
                               "model.num_attention_heads=2", "logging.wandb=false", "sampling.num_samples=0"])
    torch.manual_seed(0)
    model = build_model(cfg, 97, dims)
    out = {}
    for policy in TP_POLICIES:
        out[policy] = generate(model["denoiser"], model["schedule"], num_samples=2, seq_len=16, nfe=4,
                               generator=torch.Generator().manual_seed(0), policy=policy, eb_gamma=3.0,
                               prompt=_prompt(2, 16), remask_rate=0.1).tokens
    return out


def test_tensor_parallel_ranks_agree_and_match_one_rank(dims):
    from tests.spawn import run_ranks

    one = tp_sample_worker(0, 1)
    two = run_ranks(2, tp_sample_worker, 2)
    for policy in TP_POLICIES:
        assert torch.equal(two[0][policy], two[1][policy]), policy  # the ranks never diverge
        assert (two[0][policy] != 97).all() and (two[0][policy] < 97).all()
        assert (two[0][policy][:, :4] == _prompt(2, 16)[:, :4]).all()
    # Same weights as TP = 1 (megatron splits the same master init), logits equal up to rounding: the ancestral
    # policy picks positions by uniforms, so the samples match. (Ordering policies on this untrained, near-uniform
    # model rank positions by rounding-level differences, so there only the ranks' agreement is checked.)
    assert torch.equal(two[0]["ancestral"], one["ancestral"])
