"""Ancestral sampler: no mask token survives, prompts stay fixed, NFE bounds the denoiser calls."""

from __future__ import annotations

import pytest
import torch

from mdm_scale.config import ModelConfig
from mdm_scale.denoiser import Denoiser
from mdm_scale.sampling import ancestral_sample
from mdm_scale.schedules import BlockSchedule, LearnedPositionSchedule, UnivariateSchedule
from mdm_scale.schedules.lomdm import StateDependentSchedule


def _denoiser(heads=()):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2)
    return Denoiser(cfg, vocab_size=11, max_seq_len=16, scheduler_heads=heads)


@pytest.mark.parametrize("schedule,heads", [
    (UnivariateSchedule("loglinear"), ()), (BlockSchedule(1), ()), (BlockSchedule(4), ()),
    (LearnedPositionSchedule(16), ()), (StateDependentSchedule(), ("forward_scheduler", "backward_scheduler")),
])
def test_samples_contain_no_mask_and_keep_prompt(dims, schedule, heads):
    denoiser = _denoiser(heads)
    prompt = torch.full((3, 16), -1)
    prompt[:, :4] = torch.tensor([1, 2, 3, 4])
    calls = []
    denoiser.register_forward_hook(lambda *a: calls.append(1))
    out = ancestral_sample(denoiser, schedule, num_samples=3, seq_len=16, nfe=5,
                           generator=torch.Generator().manual_seed(0), prompt=prompt)
    assert out.shape == (3, 16) and (out != denoiser.mask_id).all() and (out < 11).all()
    assert (out[:, :4] == prompt[:, :4]).all()
    assert len(calls) == 5


def test_left_to_right_sampler_with_nfe_equal_length_reveals_one_position_per_step(dims):
    denoiser = _denoiser()
    revealed = []
    denoiser.register_forward_hook(lambda m, args, out: revealed.append((args[0] != m.mask_id).sum(-1)))
    ancestral_sample(denoiser, BlockSchedule(1), num_samples=2, seq_len=16, nfe=16,
                     generator=torch.Generator().manual_seed(0))
    counts = torch.stack(revealed)[:, 0].tolist()
    assert counts == list(range(16))  # before step k exactly k positions are clean


def test_nucleus_keeps_the_smallest_top_set_and_renormalises():
    from mdm_scale.sampling import nucleus

    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.97, 0.01, 0.01, 0.01]])
    out = nucleus(probs, 0.7)
    assert torch.allclose(out[0], torch.tensor([0.0, 0.5, 0.0, 0.25]) / 0.75)
    assert torch.equal(out[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(nucleus(probs, 1.0), probs)
