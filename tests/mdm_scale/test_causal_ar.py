"""objective.causal: the left-to-right order trained by teacher forcing on a causal denoiser (objective=ar)."""

from __future__ import annotations

import pytest
import torch

from mdm_scale.config import ConfigError, ModelConfig, load_config
from mdm_scale.denoiser import Denoiser
from mdm_scale.evaluation import exact_ar_nll
from mdm_scale.objective import nelbo
from mdm_scale.schedules import BlockSchedule, UnivariateSchedule

VOCAB, L = 50, 8


def causal_denoiser(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, init_std=0.5)
    return Denoiser(cfg, vocab_size=VOCAB, max_seq_len=L, causal=True).eval()


def test_causal_output_depends_only_on_earlier_positions(dims):
    denoiser = causal_denoiser()
    x = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = denoiser(x)
        for i in range(L):
            changed = x.clone()
            changed[0, i:] = (changed[0, i:] + 7) % VOCAB  # positions i and later
            out = denoiser(changed)
            torch.testing.assert_close(out[0, :i + 1], base[0, :i + 1], rtol=0, atol=1e-6)  # output i sees < i
            if i + 1 < L:  # ...and output i + 1 does see position i (the check can fail)
                assert (out[0, i + 1] - base[0, i + 1]).abs().max() > 1e-3


def test_one_pass_equals_every_left_to_right_slice(dims):
    """The teacher-forced NELBO of x0 (one pass) = the sum over the L slices of the NLL of the active position
    given z_t of that slice (x^(<i) visible, i and later masked), each evaluated on its own masked input."""
    denoiser, schedule = causal_denoiser(), BlockSchedule(1)
    x0 = torch.randint(0, VOCAB, (3, L), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ones = torch.ones(3, dtype=torch.float64)
        one_pass = nelbo(denoiser, schedule, x0, ones, ones, torch.zeros(3, L, dtype=torch.float64))
        slices = torch.zeros(3, dtype=torch.float64)
        for i in range(L):
            z = x0.clone()
            z[:, i:] = denoiser.mask_id
            slices += denoiser.token_nll(denoiser.output_logits(denoiser(z)[:, i]), x0[:, i]).double()
    torch.testing.assert_close(one_pass.per_sequence.double(), slices, rtol=1e-5, atol=0)
    assert one_pass.nelbo.item() == pytest.approx(slices.sum().item() / (3 * L), rel=1e-5)
    torch.testing.assert_close(exact_ar_nll(denoiser, schedule, x0), slices, rtol=1e-5, atol=0)
    # The value does not depend on the drawn t (zero variance over time) ...
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    again = nelbo(denoiser, schedule, x0, t, ones, torch.rand(3, L, dtype=torch.float64))
    torch.testing.assert_close(again.per_sequence, one_pass.per_sequence)
    # ...and an MDLM estimate of the same network is a different number (the comparison can fail).
    with pytest.raises(ValueError, match="left_to_right"):
        nelbo(denoiser, UnivariateSchedule("loglinear"), x0, t, ones, torch.rand(3, L, dtype=torch.float64))


def test_causal_gradient_reaches_every_position(dims):
    denoiser, schedule = causal_denoiser().train(), BlockSchedule(1)
    x0 = torch.randint(0, VOCAB, (2, L), generator=torch.Generator().manual_seed(3))
    ones = torch.ones(2, dtype=torch.float64)
    terms = nelbo(denoiser, schedule, x0, ones, ones, torch.zeros(2, L, dtype=torch.float64))
    terms.loss.backward()
    assert denoiser.embedding.word_embeddings.weight.grad[x0[:, :-1].unique()].abs().sum(-1).min() > 0


def test_causal_config_is_validated():
    assert load_config("tiny", ["objective=ar"]).objective.causal
    with pytest.raises(ConfigError, match="objective.causal=true .*kind=left_to_right"):
        load_config("tiny", ["objective=mdlm", "objective.causal=true"])
    with pytest.raises(ConfigError, match="left_to_right"):
        load_config("tiny", ["objective=ar", "objective.schedule.kind=right_to_left"])
    with pytest.raises(ConfigError, match="time_conditioning"):
        load_config("tiny", ["objective=ar", "model.time_conditioning=true"])
    assert not load_config("tiny", ["objective=ar", "objective.causal=false"]).objective.causal


def test_causal_denoiser_refuses_document_masks(dims):
    denoiser = causal_denoiser()
    with pytest.raises(ValueError, match="document packing"):
        denoiser(torch.zeros(1, L, dtype=torch.long), attention_mask=torch.zeros(1, 1, L, L, dtype=torch.bool))
