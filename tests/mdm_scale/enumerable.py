"""The small enumerable models the NELBO exactness tests share (V = 3 tokens, L = 4 positions: every order and
mask pattern can be enumerated by mdm_scale.exact), and the Monte Carlo means they compare against."""

from __future__ import annotations

import math

import torch

from mdm_scale.config import ModelConfig
from mdm_scale.denoiser import Denoiser
from mdm_scale.objective import nelbo
from mdm_scale.schedules import LearnedPositionSchedule
from mdm_scale.time_sampling import sample_times

V, L = 3, 4


def make_denoiser(vocab=V, seq_len=L, heads=(), seed=0, std=1.0):
    """A real (megatron) denoiser with large init so its predictions differ strongly across contexts."""
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, init_std=std, scheduler_head_size=16)
    return Denoiser(cfg, vocab_size=vocab, max_seq_len=seq_len, scheduler_heads=heads).eval()


def monte_carlo(denoiser, schedule, x0, *, draws=8, batch=4096, power=0.2, seed=0, **kw):
    """Mean and standard error of the per-sequence NELBO estimator over draws x batch samples."""
    g = torch.Generator().manual_seed(seed)
    values = []
    with torch.no_grad():
        for _ in range(draws):
            t, tw = sample_times(batch, generator=g, t_min=0.0, power=power)
            u = torch.rand(batch, x0.shape[0], generator=g, dtype=torch.float64)
            values.append(nelbo(denoiser, schedule, x0.expand(batch, -1), t, tw, u, **kw).per_sequence)
    v = torch.cat(values).double()
    return v.mean().item(), v.std().item() / math.sqrt(len(v))


def learned_schedule(seed=3):
    schedule = LearnedPositionSchedule(L)
    with torch.no_grad():
        schedule.position_logits.copy_(torch.randn(L, generator=torch.Generator().manual_seed(seed)) * 2)
    return schedule
