"""Split clipping (optimizer.schedule_grad_clip, parallel/clipping.py) on one process: each set is clipped on its
own norm, the reported norm is the global one before clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from parallel.clipping import ScheduleClip
from parallel.engine import LocalEngine


def _engine(clips: tuple[float, float] | None, grad_clip: float = 1.0, shared: bool = False):
    model = nn.ModuleDict({"denoiser": nn.Linear(4, 3), "schedule": nn.Linear(4, 2)})
    schedule = list(model["schedule"].parameters())
    rest = list(model["denoiser"].parameters())
    optimizer = torch.optim.SGD([{"params": rest}, {"params": schedule}], lr=1.0)  # update = -clipped gradient
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    split = ScheduleClip(model, schedule, *clips, shared=shared) if clips is not None else None
    engine = LocalEngine(model, optimizer, lr_schedule, grad_clip=grad_clip, grad_accumulation=1, schedule_clip=split)
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(grads))) * (
            10.0 if name.startswith("schedule") else 0.1)
        grads[name] = p.grad.clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    return engine, model, grads, before


def _set_norm(tensors: dict, prefix: str) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for n, t in tensors.items() if n.startswith(prefix)))


@pytest.mark.parametrize("clips", [(1.0, 0.5), (0.1, 0.5), (0.0, 2.0), (1.0, 0.0)])
def test_each_set_is_clipped_on_its_own_norm(clips):
    engine, model, grads, before = _engine(clips)
    norm = engine.step()
    updates = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    for prefix, clip in zip(("denoiser", "schedule"), clips):
        raw = _set_norm(grads, prefix)
        expected = min(raw, clip) if clip else raw
        assert _set_norm(updates, prefix) == pytest.approx(expected, rel=1e-5), prefix
    assert norm == pytest.approx(math.hypot(_set_norm(grads, "denoiser"), _set_norm(grads, "schedule")), rel=1e-6)


def test_a_shared_clip_lets_the_schedule_set_shrink_the_denoiser_update():
    """The reason for the split (the check above can fail): with one global clip the denoiser's update is its
    gradient times clip / global norm, which the schedule's large gradient dominates."""
    engine, model, grads, before = _engine(None)
    engine.step()
    update = _set_norm({n: before[n] - p.detach() for n, p in model.named_parameters()}, "denoiser")
    raw = _set_norm(grads, "denoiser")
    assert raw < 1.0 and update < raw / 5


@pytest.mark.parametrize("grad_clip", [0.5, 0.0])
def test_shared_mode_clips_like_torch_and_measures_the_schedule_norm(grad_clip):
    """schedule_grad_clip = 0 with a learned schedule: one factor from the global norm (torch's clip_grad_norm_,
    also when grad_clip = 0: unclipped), and the schedule's norm kept for the log."""
    reference, ref_model, _, ref_before = _engine(None, grad_clip=grad_clip)
    engine, model, grads, before = _engine((grad_clip, 0.0), grad_clip=grad_clip, shared=True)
    assert engine.schedule_norm is None or math.isnan(engine.schedule_norm)
    assert engine.step() == pytest.approx(reference.step(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(before[name] - p.detach(), ref_before[name] - q.detach(), rtol=1e-5, atol=1e-7)
    assert engine.schedule_norm == pytest.approx(_set_norm(grads, "schedule"), rel=1e-6)
    assert reference.schedule_norm is None  # no learned schedule: nothing to measure
    engine.step(skip=True)
    assert math.isnan(engine.schedule_norm)  # a skipped step measures nothing
