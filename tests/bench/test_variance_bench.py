"""bench/variance.py's data modes: which batch each gradient draw sees (the variance decomposition rests on it)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import variance as variance_bench  # noqa: E402
from mdm_scale.config import ModelConfig, ObjectiveConfig  # noqa: E402
from mdm_scale.denoiser import Denoiser  # noqa: E402
from mdm_scale.schedules import UnivariateSchedule  # noqa: E402

V, L, POOL = 5, 6, 64


def tiny_model():
    torch.manual_seed(0)
    denoiser = Denoiser(ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2), vocab_size=V,
                        max_seq_len=L)
    return torch.nn.ModuleDict({"denoiser": denoiser, "schedule": UnivariateSchedule("loglinear", 1e-3)})


@pytest.mark.parametrize("estimator", ["uniform", "mirror+p_pots"])
@pytest.mark.parametrize("data_mode", ["fixed", "resampled", "within"])
def test_each_data_mode_feeds_the_draws_it_promises(dims, monkeypatch, estimator, data_mode):
    pool = torch.stack([torch.tensor([(r // V**k) % V for k in range(L)]) for r in range(POOL)])  # distinct rows (r in base V)
    seen = []
    real_draw = variance_bench.draw

    def recording_draw(model, cfg, sampler, x0, seed, with_grad):
        if with_grad:  # the measured draws (P-POTS's warm-up draws are forward only)
            seen.append(x0.clone())
        return real_draw(model, cfg, sampler, x0, seed, with_grad)

    monkeypatch.setattr(variance_bench, "draw", recording_draw)
    args = SimpleNamespace(batch=4, warmup=2, draws=8)
    result = variance_bench.measure(tiny_model(), SimpleNamespace(objective=ObjectiveConfig()), pool, args,
                                    estimator, data_mode)
    sequences = 2 if "mirror" in estimator else 4  # equal tokens: a MIRROR pair is two rows
    assert len(seen) == 8 and all(x.shape == (sequences, L) for x in seen)
    same_in_pair = [torch.equal(seen[i], seen[i + 1]) for i in range(0, 8, 2)]
    same_across_pairs = [torch.equal(seen[i], seen[i + 2]) for i in range(0, 6, 2)]
    if data_mode == "fixed":
        assert all(torch.equal(x, pool[:sequences]) for x in seen)
    elif data_mode == "within":  # E_x Var(g | x): the pair shares its batch, pairs differ
        assert all(same_in_pair) and not any(same_across_pairs)
    else:  # resampled: data noise included
        assert not any(same_in_pair) and not any(same_across_pairs)
    for key in ("loss_var", "grad_var"):
        value, half_width = result[key]
        assert math.isfinite(value) and value > 0 and math.isfinite(half_width), (key, result[key])


@pytest.mark.parametrize("data_mode", ["fixed", "within"])
def test_two_draw_row_pairs_each_sequence_with_a_second_mask_at_equal_tokens(dims, monkeypatch, data_mode):
    """The two_draw row (the LoMDM paper's Eq. 8 baseline) for a learned schedule: half the sequences, each twice
    at one t with independent masks, so every draw has the same number of rows as the others; the schedule's
    share of the gradient variance is measured."""
    from mdm_scale.config import ScheduleConfig
    from mdm_scale.schedules import LearnedPositionSchedule

    pool = torch.stack([torch.tensor([(r // V**k) % V for k in range(L)]) for r in range(POOL)])
    model = tiny_model()
    model["schedule"] = LearnedPositionSchedule(L)
    with torch.no_grad():
        model["schedule"].position_logits.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    seen, rows = [], []
    real_draw = variance_bench.draw

    def recording_draw(model, cfg, sampler, x0, seed, with_grad):
        loss, grad, terms = real_draw(model, cfg, sampler, x0, seed, with_grad)
        seen.append(x0.clone())
        rows.append(terms.t)
        return loss, grad, terms

    monkeypatch.setattr(variance_bench, "draw", recording_draw)
    objective = ObjectiveConfig(schedule=ScheduleConfig(kind="mdm_ls"))
    result = variance_bench.measure(model, SimpleNamespace(objective=objective), pool,
                                    SimpleNamespace(batch=4, warmup=2, draws=8), "two_draw", data_mode)
    assert len(seen) == 8 and all(x.shape == (2, L) for x in seen)  # 2 sequences x 2 draws = 4 rows
    assert all(t.shape == (4,) and torch.equal(t[:2], t[2:]) for t in rows)  # a pair shares its time
    for key in ("loss_var", "grad_var", "schedule_grad_var"):
        value, half_width = result[key]
        assert math.isfinite(value) and value > 0 and math.isfinite(half_width), (key, result[key])
    assert variance_bench.ESTIMATORS["two_draw"][3] == "two_draw" and "two_draw" in variance_bench.DEFAULT_ESTIMATORS
