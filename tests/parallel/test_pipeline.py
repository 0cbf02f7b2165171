"""Pipeline parallelism through megatron-core's 1F1B schedule on real gloo ranks: PP=2 equals PP=1."""

from __future__ import annotations

import pytest

from parallel.consolidate import consolidate

from tests.parallel import pipeline_workers, workers
from tests.spawn import run_ranks

OBJECTIVES = ["mdlm", "ar", "block", "mdm_ls", "lomdm", "lomdm+documents",  # +documents: packed, masked
              "lomdm_paper+documents"]  # scheduler transformer layers, two draws per sequence


@pytest.fixture(scope="module")
def single_and_pipelined():
    single = run_ranks(1, pipeline_workers.pipeline_gradients, OBJECTIVES, 1, None)[0]
    return single, run_ranks(2, pipeline_workers.pipeline_gradients, OBJECTIVES, 2, single)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_pipeline_parallel_matches_single_stage(single_and_pipelined, objective):
    single, stages = single_and_pipelined
    ref = single[objective]
    assert len(ref["losses"]) == 4 and stages[0][objective]["losses"] == []  # only the last stage has losses
    assert stages[1][objective]["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    grads = {**stages[0][objective]["grads"], **stages[1][objective]["grads"]}
    overall = max(g.abs().max().item() for g in ref["grads"].values())
    assert set(grads) == set(ref["grads"])  # every parameter got its gradient on exactly one stage (or both)
    for name, g_ref in ref["grads"].items():
        tolerance = 1e-5 * g_ref.abs().max().item() + 1e-7 * overall
        assert (grads[name] - g_ref).abs().max().item() <= tolerance, name


def test_pipeline_parallel_training_matches_single_process(tmp_path):
    """The training loop at PP=2 (DeepSpeed steps after megatron's schedule) follows PP=1's losses and weights,
    resumes exactly from its sharded checkpoint, and that checkpoint consolidates to PP=1's weights."""
    common = ["train.steps=4", "optimizer.lr=1e-3", "optimizer.warmup_steps=1", "optimizer.grad_clip=0.5",
              "data.micro_batch_size=2", "data.grad_accumulation=4", *pipeline_workers.PP_MODEL]
    ref = run_ranks(1, workers.train_run, [*common, f"run_dir={tmp_path / 'ref'}"])[0]
    split = run_ranks(2, workers.train_run, [*common, f"run_dir={tmp_path / 'pp'}", "parallel.pipeline_parallel=2",
                                             "train.stop_at=2"])
    resumed = run_ranks(2, workers.train_run, [*common, f"run_dir={tmp_path / 'pp'}", "parallel.pipeline_parallel=2"])
    losses = {**split[0]["losses"], **resumed[0]["losses"]}
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in ref["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
        assert resumed[1]["losses"].get(step, losses[step]) == losses[step]  # every stage logs the same loss
    full = consolidate(resumed[0]["checkpoint"])
    assert set(full) >= set(ref["params"])
    for name, weight in ref["params"].items():  # absolute: Adam amplifies round-off of zero-gradient entries
        assert (full[name] - weight).abs().max().item() < 1e-5, name
