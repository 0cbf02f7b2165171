"""bench/step.py and the MDLM reference step: the report has finite ratios, the reference step really trains."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import step as step_bench  # noqa: E402
from bench.mdlm_reference import DIT, MDLMReferenceTrainer, ReferenceConfig, subs_log_probs  # noqa: E402

NUMBER = r"([-+0-9.,eEinfa]+)"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_bench_main_reports_finite_positive_ratios(dims, capsys):
    report = step_bench.main([
        "--config", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "4", "--seq", "32",
        "--override", "model.hidden_size=32", "--override", "model.num_attention_heads=2",
        "--override", "model.scheduler_head_size=16", "--override", "data.tokenizer=byte",
    ])
    assert report in capsys.readouterr().out
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].split(":")[0] in step_bench.VARIANTS:
            rows[cells[0].split(":")[0]] = cells
    assert set(rows) == {"ref_mdlm", "mdlm", "lomdm"}, report
    for name, cells in rows.items():
        step_ms, tokens_per_s, masked = _number(cells[2]), _number(cells[4]), _number(cells[5])
        assert math.isfinite(step_ms) and step_ms > 0, (name, cells)
        assert math.isfinite(tokens_per_s) and tokens_per_s > 0, (name, cells)
        assert 0 < masked < 1, (name, cells)
        # the step time and tokens/s agree on b * l = 4 * 32 tokens per step
        assert tokens_per_s == pytest.approx(128 / (step_ms / 1e3), rel=0.01)
    for label in ("ratio ours_mdlm/ref tokens/s", "ratio lomdm/mdlm step time"):
        match = re.search(re.escape(label) + r": " + NUMBER, report)
        assert match, (label, report)
        value = _number(match.group(1))
        assert math.isfinite(value) and value > 0, (label, value)
    # ratios are what the table says
    ref, ours, lomdm = (_number(rows[k][2]) for k in ("ref_mdlm", "mdlm", "lomdm"))
    ratio = _number(re.search(r"ratio ours_mdlm/ref tokens/s: " + NUMBER, report).group(1))
    assert ratio == pytest.approx(ref / ours, rel=0.02)
    ratio = _number(re.search(r"ratio lomdm/mdlm step time: " + NUMBER, report).group(1))
    assert ratio == pytest.approx(lomdm / ours, rel=0.02)
    losses = dict(re.findall(r"(\w+) ([-0-9.]+|nan|inf)", report.split("losses at the last timed step:")[1]))
    assert all(math.isfinite(float(v)) for v in losses.values()), losses


def _tiny_reference(vocab: int = 64, seed: int = 0, **cfg) -> MDLMReferenceTrainer:
    torch.manual_seed(seed)
    model = DIT(vocab + 1, hidden_size=32, n_heads=2, n_blocks=2, cond_dim=16, dropout=0.0)
    return MDLMReferenceTrainer(model, ReferenceConfig(**cfg))


def _fixed_noise_loss(trainer: MDLMReferenceTrainer, x0: torch.Tensor, seeds=range(4)) -> float:
    """Loss averaged over a few fixed noise draws (same t and masks before and after training)."""
    values = []
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(1000 + seed)
            values.append(trainer.loss(x0).item())
    return sum(values) / len(values)


def test_reference_step_trains_on_a_repeated_batch():
    """20 AdamW steps on one batch whose tokens use 8 of the 64 ids: the loss under fixed noise draws must fall
    from ~log 64 towards log 8 (the per-step losses are too noisy to compare, with their 1/t weights)."""
    trainer = _tiny_reference(lr=3e-3, warmup_steps=0, ema=0.9999)
    x0 = torch.randint(0, 8, (8, 32), generator=torch.Generator().manual_seed(0))
    before = _fixed_noise_loss(trainer, x0)
    losses = [trainer.step(x0) for _ in range(10)]
    middle = _fixed_noise_loss(trainer, x0)
    losses += [trainer.step(x0) for _ in range(10)]
    after = _fixed_noise_loss(trainer, x0)
    assert all(math.isfinite(v) for v in losses), losses
    assert before == pytest.approx(math.log(64), rel=0.1)
    assert after < middle < before, (before, middle, after)
    assert after < 0.7 * before, (before, after, losses)
    assert trainer.ema.num_updates == 20


def test_reference_loss_does_not_move_without_updates():
    """Control for the test above: with lr 0 the same 20 steps leave the fixed-noise loss where it was."""
    trainer = _tiny_reference(lr=0.0, warmup_steps=0)
    x0 = torch.randint(0, 8, (8, 32), generator=torch.Generator().manual_seed(0))
    before = _fixed_noise_loss(trainer, x0)
    for _ in range(20):
        trainer.step(x0)
    assert _fixed_noise_loss(trainer, x0) == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize("vocab", [64, 1000])
def test_reference_loss_at_initialisation_is_log_vocab(vocab):
    """Uniform predictions over the real vocabulary (the mask never gets mass): E[loss] = (1 - eps) log V,
    whatever the masking rate, because the 1/t weight undoes the masking probability (1 - eps) t."""
    trainer = _tiny_reference(vocab)
    with torch.no_grad():  # small random head: near-uniform, not exactly (the zero init would make it trivial)
        trainer.model.output_layer.linear.weight.normal_(0, 1e-3)
    x0 = torch.randint(0, vocab, (64, 64), generator=torch.Generator().manual_seed(0))
    loss = _fixed_noise_loss(trainer, x0, seeds=range(8))
    assert loss == pytest.approx((1 - 1e-3) * math.log(vocab), rel=0.05)


def test_subs_log_probs_copy_unmasked_and_never_predict_the_mask():
    vocab, mask = 10, 10
    torch.manual_seed(0)
    logits = torch.randn(2, 5, vocab + 1)
    xt = torch.tensor([[mask, 3, mask, 7, 0], [1, mask, mask, mask, 9]])
    log_p = subs_log_probs(logits.clone(), xt, mask)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    assert (log_p[..., mask].exp() < 1e-6).all()
    unmasked = xt != mask
    assert (log_p[unmasked].gather(-1, xt[unmasked][:, None]) == 0).all()
    expected = torch.log_softmax(logits[..., :vocab], -1)
    assert torch.allclose(log_p[~unmasked][:, :vocab], expected[~unmasked], atol=1e-5)


def test_model_flops_formula_for_owt_small():
    # N = 12 (4 * 768^2 + 2 * 768 * 3072) + 768 * 50257 = 123,532,032; F = 6 N + 12 * 12 * 768 * 1024
    assert step_bench.matmul_params(12, 768, 3072, 50257) == 123_532_032
    mdlm = step_bench.flops_per_token(12, 768, 3072, 50257, 1024, clean_pass=False)
    lomdm = step_bench.flops_per_token(12, 768, 3072, 50257, 1024, clean_pass=True)
    assert mdlm == 6 * 123_532_032 + 12 * 12 * 768 * 1024
    assert lomdm - mdlm == 2 * (123_532_032 - 768 * 50257) + 4 * 12 * 768 * 1024
