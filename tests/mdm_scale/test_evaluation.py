"""The eval command: a checkpoint's held-out NELBO, independent of the number of ranks; exact NLL for AR."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mdm_scale.config import load_config
from mdm_scale.evaluation import evaluate_checkpoint, main
from mdm_scale.train import train
from tests.parallel import workers
from tests.spawn import run_ranks

FAST = [
    "data.source=committed", "data.tokenizer=byte", "data.seq_len=16", "data.micro_batch_size=4",
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.tie_embeddings=false",
    "logging.wandb=false", "logging.progress=false", "train.eval_batches=2", "train.eval_every=0",
    "sampling.num_samples=0", "train.steps=30", "optimizer.warmup_steps=3",
]


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory):
    from parallel.distributed import init_distributed

    init_distributed(device="cpu", seed=0)
    root = tmp_path_factory.mktemp("eval")
    # The one-slice (masked-diffusion) form: its NELBO is an estimate, so the evaluation's noise is exercised.
    cfg = load_config("tiny", [*FAST, "objective=ar", "objective.causal=false", f"run_dir={root / 'ar'}",
                               f"data.cache_dir={root / 'cache'}"])
    return train(cfg).checkpoint


def test_causal_ar_checkpoint_nelbo_is_its_exact_nll_in_one_pass(dims, tmp_path):
    cfg = load_config("tiny", [*FAST, "objective=ar", f"run_dir={tmp_path / 'ar'}",
                               f"data.cache_dir={tmp_path / 'cache'}"])
    out = evaluate_checkpoint(train(cfg).checkpoint, max_batches=3, time_samples=16)
    assert out["tokens"] == 3 * 4 * 16  # one pass per batch: every time sample would give the same value
    assert out["nelbo"] == pytest.approx(out["exact_nll"], rel=1e-6)
    assert 0 < out["exact_nll"] < math.log(257)


def test_ar_checkpoint_nelbo_estimates_its_exact_nll(dims, ar_checkpoint):
    out = evaluate_checkpoint(ar_checkpoint, max_batches=3, time_samples=16)
    assert out["tokens"] == 3 * 4 * 16 * 16 and out["batches"] == 3
    assert math.isfinite(out["exact_nll"]) and 0 < out["exact_nll"] < math.log(257)  # trained below uniform
    # The Rao-Blackwellised left-to-right estimator is unbiased for the causal NLL: 768 draws land close.
    assert out["nelbo"] == pytest.approx(out["exact_nll"], rel=0.1)
    assert out["bits_per_token"] == pytest.approx(out["nelbo"] / math.log(2))


def test_standard_error_is_the_spread_of_the_batch_means(dims, ar_checkpoint):
    """Each batch's noise is seeded by its index, so the first k batches of a longer evaluation are the k-batch
    evaluation: per-batch NELBOs come out by differencing, and (equal token counts here) the ratio's standard
    error must be their sample std over sqrt(K)."""
    kwargs = {"time_samples": 2, "exact_ar": False}
    runs = [evaluate_checkpoint(ar_checkpoint, max_batches=k, **kwargs) for k in (1, 2, 3, 4)]
    totals = [0.0] + [r["nelbo"] * r["tokens"] for r in runs]
    draws = runs[0]["tokens"]
    per_batch = np.diff(totals) / draws
    assert math.isnan(runs[0]["nelbo_stderr"])  # one batch: no spread to measure
    assert per_batch.std(ddof=1) > 0
    assert runs[-1]["nelbo_stderr"] == pytest.approx(per_batch.std(ddof=1) / math.sqrt(4), rel=1e-6)


def test_two_ranks_give_the_one_rank_result(dims, ar_checkpoint):
    kwargs = {"max_batches": 3, "time_samples": 4, "exact_ar": False}
    one = evaluate_checkpoint(ar_checkpoint, **kwargs)
    two = run_ranks(2, workers.evaluate_run, ar_checkpoint, kwargs)
    assert two[0] == two[1]
    assert two[0]["tokens"] == one["tokens"] and two[0]["nelbo"] == pytest.approx(one["nelbo"], rel=1e-9)
    assert two[0]["nelbo_stderr"] == pytest.approx(one["nelbo_stderr"], rel=1e-6)


def test_cli_prints_the_summary(dims, ar_checkpoint, capsys):
    assert main([ar_checkpoint, "--batches", "1", "--time-samples", "2"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("heldout: NELBO ") and "bits/token" in line and "exact AR NLL" in line
    assert "+- nan (stderr)" in line  # one batch


def test_sampling_cli_generates_from_a_checkpoint_with_a_prompt(dims, ar_checkpoint, capsys):
    from mdm_scale.sampling import main as sample

    assert sample([ar_checkpoint, "--num-samples", "2", "--nfe", "16", "--prompt", "The ", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    samples = [block.split("\n", 1)[1] for block in out.split("--- sample ")[1:]]
    assert len(samples) == 2 and all(s.startswith("The ") for s in samples)
    assert "NFE 16, " in out and " forward passes, " in out and "tokens/s" in out


def _damaged_copy(checkpoint, tmp_path, damage):
    """A copy of the checkpoint's run (config.yaml + the checkpoint) with one file damaged."""
    import shutil
    from pathlib import Path

    src = Path(checkpoint)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(src.parent.parent / "config.yaml", run / "config.yaml")
    copy = Path(shutil.copytree(src, run / "checkpoints" / src.name))
    weights = next(copy.glob("model-*.safetensors"))
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    return str(copy)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_evaluation_and_sampling_refuse_a_corrupt_checkpoint(dims, ar_checkpoint, tmp_path, capsys, damage):
    """One flipped bit in the weights once gave a different NELBO (a truncation: NELBO nan), exit code 0."""
    from parallel.checkpoint import CheckpointError
    from mdm_scale.sampling import main as sample

    bad = _damaged_copy(ar_checkpoint, tmp_path, damage)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        evaluate_checkpoint(bad, max_batches=1, time_samples=1)
    assert main([bad, "--batches", "1"]) == 2
    assert sample([bad, "--num-samples", "1", "--nfe", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "sha256 mismatch" in line for line in err), err


def test_evaluating_a_run_directory_names_its_newest_checkpoint(dims, ar_checkpoint, capsys):
    from pathlib import Path

    run_dir = Path(ar_checkpoint).parent.parent
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint directory" in err and f"newest checkpoint is {ar_checkpoint}" in err


def test_order_form_evaluation_of_a_univariate_polynomial_run_matches_its_time_form(dims, tmp_path):
    """estimator="order" (t_min 0) and the time form estimate the same NELBO for a polynomial schedule with
    w = 1 (the time form's t_min truncation costs t_min^1 = 1e-3 of it): equal within their standard errors."""
    cfg = load_config("tiny", [*FAST, "objective.schedule.kind=polynomial", "train.steps=20",
                               f"run_dir={tmp_path / 'poly'}", f"data.cache_dir={tmp_path / 'cache'}"])
    checkpoint = train(cfg).checkpoint
    time_form = evaluate_checkpoint(checkpoint, max_batches=8, time_samples=8)
    order_form = evaluate_checkpoint(checkpoint, max_batches=8, time_samples=8, estimator="order")
    gap = abs(time_form["nelbo"] - order_form["nelbo"])
    assert gap < 4 * math.hypot(time_form["nelbo_stderr"], order_form["nelbo_stderr"]), (time_form, order_form)
    assert order_form["nelbo"] != time_form["nelbo"]  # a different estimator really ran
