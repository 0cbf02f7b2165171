"""tune-schedule end to end on tiny checkpoints (an MDLM run and an objective=ar scorer), the generation NLL, and
the `python -m mdm_scale` dispatcher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mdm_scale.config import load_config
from mdm_scale.train import train

FAST = [
    "data.source=committed", "data.tokenizer=byte", "data.seq_len=16", "data.micro_batch_size=4",
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.tie_embeddings=false",
    "logging.wandb=false", "logging.progress=false", "train.eval_batches=1", "train.eval_every=0",
    "sampling.num_samples=0", "train.steps=8", "optimizer.warmup_steps=2",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from parallel.distributed import init_distributed

    init_distributed(device="cpu", seed=0)
    root = tmp_path_factory.mktemp("tune")
    out = {}
    for name, objective in (("mdlm", "mdlm"), ("ar", "ar")):
        cfg = load_config("tiny", [*FAST, f"objective={objective}", f"run_dir={root / name}",
                                   f"data.cache_dir={root / 'cache'}"])
        out[name] = str(train(cfg).checkpoint)
    return out


def test_generation_nll_is_the_ar_models_exact_nll(dims, checkpoints):
    from mdm_scale.evaluation import exact_ar_nll
    from mdm_scale.sampling import generation_nll, load_scorer

    scorer = load_scorer(checkpoints["ar"])
    tokens = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(0))
    out = generation_nll(tokens, scorer)
    per_sequence = exact_ar_nll(scorer.denoiser, scorer.schedule, tokens).numpy() / 16  # nats/token of each
    assert out["nll"] == pytest.approx(per_sequence.mean())
    assert out["nll_stderr"] == pytest.approx(np.std(per_sequence, ddof=1) / math.sqrt(3)) and out["nll_stderr"] > 0
    assert generation_nll(tokens[:1], scorer)["nll_stderr"] is None
    assert out["ppl"] == pytest.approx(math.exp(out["nll"])) and out["tokens"] == 48
    assert 0.5 * math.log(257) < out["nll"] < 2 * math.log(257)  # random tokens: about uniform
    with pytest.raises(ValueError, match="autoregressive"):
        load_scorer(checkpoints["mdlm"])
    with pytest.raises(ValueError, match="vocabulary"):
        generation_nll(torch.full((1, 16), 257), scorer)  # a mask token left


def test_tune_schedule_writes_the_json_and_the_sampling_cli_uses_it(dims, checkpoints, capsys):
    from mdm_scale.__main__ import main

    ckpt = checkpoints["mdlm"]
    assert main(["tune-schedule", ckpt, "--nfe", "4", "--scorer", checkpoints["ar"], "--grid", "1,4",
                 "--no-refine", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    record = json.loads((Path(ckpt) / "tuned_schedule.json").read_text())
    assert record["nfe"] == 4 and record["scorer"] == checkpoints["ar"]
    table = record["table"]
    assert sorted(tuple(r["beta"]) for r in table) == [(1, 1), (1, 4), (4, 1), (4, 4)]
    best = min(table, key=lambda r: r["nll"])
    assert record["beta"] == best["beta"] and record["score"] == best["nll"] and math.isfinite(record["score"])
    assert len({r["nll"] for r in table}) > 1  # the grid changes the samples
    assert f"best Beta({best['beta'][0]:g}, {best['beta'][1]:g}) for NFE 4" in out

    # The sampling CLI picks the tuned (a, b) for its nfe (default nfe = the tuned one) unless --beta is given.
    record["beta"] = [4.0, 1.0]  # a known value, whatever won
    (Path(ckpt) / "tuned_schedule.json").write_text(json.dumps(record))
    assert main(["sample", ckpt, "--num-samples", "2", "--scorer", checkpoints["ar"]]) == 0
    out = capsys.readouterr().out
    assert "NFE 4," in out and "Beta(4, 1) time grid from tuned_schedule.json" in out
    assert "generation NLL " in out and "PPL " in out
    assert main(["sample", ckpt, "--num-samples", "2", "--nfe", "4", "--beta", "2", "3"]) == 0
    assert "Beta(2, 3) time grid from --beta" in capsys.readouterr().out
    assert main(["sample", ckpt, "--num-samples", "2", "--nfe", "3"]) == 0  # another nfe: uniform
    out = capsys.readouterr().out
    assert "NFE 3," in out and "Beta(1, 1) time grid from uniform" in out
    # eb reports its adaptive NFE
    assert main(["sample", ckpt, "--num-samples", "1", "--policy", "eb", "--eb-gamma", "0"]) == 0
    assert "NFE 16," in capsys.readouterr().out


def test_tuned_schedule_search_refines_around_the_best(dims, checkpoints):
    from mdm_scale.export import load_for_inference
    from mdm_scale.sampling import load_scorer
    from mdm_scale.tune_schedule import finer_grid, tune_beta

    assert sorted(finer_grid((1.0, 2.0))) == sorted(
        (round(a, 6), round(b, 6)) for a in (2 ** -0.5, 1, 2 ** 0.5) for b in (2 ** 0.5, 2, 2 ** 1.5))
    _, _, model, _ = load_for_inference(checkpoints["mdlm"])
    lines = []
    result = tune_beta(model["denoiser"], model["schedule"], load_scorer(checkpoints["ar"]), nfe=2, grid=[1.0],
                       num_samples=1, seq_len=8, log=lines.append)
    assert len(result["rows"]) == 9 and len(lines) == 10  # (1, 1), then its 8 new neighbours; header
    assert result["best"] == min(result["rows"], key=lambda r: r["nll"])
    with pytest.raises(ValueError, match="eb"):
        tune_beta(model["denoiser"], model["schedule"], None, nfe=2, policy="eb")


def test_dispatcher_lists_the_commands(capsys):
    from mdm_scale.__main__ import main

    assert main([]) == 0 and "tune-schedule" in capsys.readouterr().out
    assert main(["nonsense"]) == 2 and "unknown command" in capsys.readouterr().err
