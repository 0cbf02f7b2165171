"""parallel/plan.py (`launchers/slurm.py --plan`): exact parameter counts against built models and real TP = 2 /
PP = 2 shards, bytes that scale with ZeRO stage and DP as the engine stores them, Korthikanti et al.'s activation
formula, and the CLI printing the 16-node owt_1b plan without submitting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mdm_scale.config import load_config
from parallel.plan import (Layout, _one_process_group, block_activation_bytes, format_plan, full_model, plan,
                           stage_params)
from tests.parallel.plan_workers import PLAN_MODEL, shard_sizes
from tests.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[2]
OBJECTIVES = ["mdlm", "mdm_ls", "lomdm_paper"]  # plain; schedule parameters on every stage; TP-split scheduler layers


def _cfg(objective: str, *overrides: str):
    return load_config("tiny", [*PLAN_MODEL, f"objective={objective}", "model.tie_embeddings=false", *overrides])


@pytest.mark.parametrize("objective", [*OBJECTIVES, "mdlm+tied"])
def test_plan_counts_equal_a_built_model_at_tp1(objective):
    from mdm_scale.model import build_model
    from parallel.distributed import ParallelDims

    objective, _, tied = objective.partition("+")
    cfg = _cfg(objective, *(["model.tie_embeddings=true"] if tied else []))
    with _one_process_group():
        built = build_model(cfg, 257, ParallelDims(1, 0, 0, 1, 1, torch.device("cpu")))
    assert stage_params(full_model(cfg, 257), 1, 1, cfg.model.num_layers) == [
        sum(p.numel() for p in built.parameters())]


def test_plan_counts_equal_real_tp2_and_pp2_shards():
    ranks = run_ranks(2, shard_sizes, OBJECTIVES)
    for objective in OBJECTIVES:
        cfg = _cfg(objective, "parallel.tensor_parallel=2")
        assert stage_params(full_model(cfg, 257), 2, 1, cfg.model.num_layers) == [ranks[0][objective]["tp2"]] * 1
        assert ranks[0][objective]["tp2"] == ranks[1][objective]["tp2"]
        cfg = _cfg(objective, "parallel.pipeline_parallel=2")
        assert stage_params(full_model(cfg, 257), 1, 2, cfg.model.num_layers) == [r[objective]["pp2"] for r in ranks]


def _ranks(zero: int, dp: int, tp: int = 1, **kw):
    cfg = _cfg("mdlm", f"parallel.tensor_parallel={tp}", f"parallel.zero_stage={zero}")
    return plan(cfg, Layout(1, dp * tp, tp, 1, zero, gpu=kw.get("gpu", True)), 257)


def test_bytes_scale_with_zero_stage_and_data_parallelism():
    (z0,), (z0_dp4,), (z1,), (z1_dp4,), (z2,), (z2_dp4,) = (_ranks(z, dp) for z in (0, 1, 2) for dp in (2, 4))
    p = z0.params
    assert z0.optimizer == z0_dp4.optimizer == 8 * p  # replicated AdamW moments, no master copy (fp32 weights)
    assert z0.gradients == z0_dp4.gradients == 4 * p
    assert (z1.optimizer, z1_dp4.optimizer) == (12 * p / 2, 12 * p / 4)  # master + moments, partitioned
    assert (z1.gradients, z1_dp4.gradients) == (4 * p + 4 * p / 2, 4 * p + 4 * p / 4)
    assert (z2.gradients, z2_dp4.gradients) == (8 * p / 2, 8 * p / 4)
    assert z0.weights == z1.weights == z2_dp4.weights == 6 * p  # fp32 + autocast's bf16 copies
    assert z0.checkpoint_dp0 == z1_dp4.checkpoint_dp0 > 12 * p  # weights + moments, once per place
    assert z1.total > z1_dp4.total > z2_dp4.total
    assert z1_dp4.comm.dp == pytest.approx(2 * 3 / 4 * 4 * p)
    (tp2,) = _ranks(1, 2, tp=2)
    assert tp2.params < p < 2 * tp2.params  # TP splits the blocks and the vocabulary, not the norms
    (cpu,) = _ranks(0, 1, gpu=False)
    assert cpu.buffers == 0 and cpu.weights == 4 * p  # one process: plain AdamW, no bucket, no autocast


def test_activations_follow_korthikanti_and_shrink_with_recompute_and_sequence_parallelism():
    s, b, h, a = 1024, 8, 2048, 16
    for t in (1, 2, 4):
        kept, _ = block_activation_bytes(s=s, b=b, h=h, a=a, t=t, recompute="none", sequence_parallel=False,
                                         dropout=True, fused_attention=False, gpu=True)
        # the paper's s b h (10 + 24/t + 5 a s / (h t)), plus 4 s b h: the norms' inputs are fp32 under autocast
        assert kept == pytest.approx(s * b * h * (10 + 4 + 24 / t + 5 * a * s / (h * t)))
        sp, _ = block_activation_bytes(s=s, b=b, h=h, a=a, t=t, recompute="selective", sequence_parallel=True,
                                       dropout=True, fused_attention=False, gpu=True)
        assert sp == pytest.approx(s * b * h * (34 + 4) / t)
    (r,) = _ranks(1, 2, tp=2)
    act = r.activations
    assert act[("full", True)] < act[("full", False)] < act[("selective", False)] < act[("none", False)]
    assert act[("selective", True)] < act[("selective", False)] and act[("none", True)] < act[("none", False)]


def test_lomdm_plans_more_activations_than_mdlm():
    mdlm, lomdm = (plan(_cfg(o, "parallel.tensor_parallel=2"), Layout(1, 2, 2, 1, 1, gpu=True), 257)[0]
                   for o in ("mdlm", "lomdm_paper"))
    assert lomdm.activations[lomdm.configured] > mdlm.activations[mdlm.configured]
    assert lomdm.params > mdlm.params


def test_cli_prints_the_16_node_owt_1b_plan_without_submitting(capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "launchers"))
    import slurm

    submitted = []
    monkeypatch.setattr("submitit.SlurmExecutor.submit", lambda *a, **k: submitted.append(a))
    assert slurm.main(["--nodes", "16", "--plan", "config=owt_1b"]) == 0
    out = capsys.readouterr().out
    h, v, f, layers = 2048, 50304, 8192, 24
    block = (3 * h * h + 3 * h + h * h + f * h + f + h * f) / 2 + 2 * h + 4 * h  # split + replicated
    params = layers * block + v * h + 2 * h  # + embedding and head (each split in 2) + final norm
    assert f"| tp 0-1 pp 0 | {params / 1e6:,.1f} M |" in out
    assert "16 node(s) x 8 ranks = TP 2 x PP 1 x DP 64, ZeRO 1" in out
    assert "largest node" in out and "over 128 ranks" in out
    assert not submitted
    ranks = plan(load_config("owt_1b"), Layout(16, 8, 2, 1, 1, gpu=True), 50257)
    assert format_plan(load_config("owt_1b"), Layout(16, 8, 2, 1, 1, gpu=True), ranks) in out
