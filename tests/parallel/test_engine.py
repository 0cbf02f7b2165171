"""Data parallelism and ZeRO (DeepSpeed, megatron parallel_state as mpu) against single-process AdamW."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parallel import workers
from tests.spawn import run_ranks

STEPS = ["train.steps=5", "optimizer.lr=1e-3", "optimizer.warmup_steps=1", "optimizer.grad_clip=0.5",
         "logging.log_every=1"]


def _max_abs_diff(a: dict, b: dict) -> float:
    """Largest parameter difference. Absolute, not relative: Adam turns the round-off of (near-)zero gradient
    components (e.g. the K bias under softmax shift invariance) into updates of about +-lr, so elementwise
    relative checks fail on those entries while every other entry agrees to ~1e-7 (../shared/docs/STACK.md)."""
    return max((b[name] - ref).abs().max().item() for name, ref in a.items())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP=1 x DP=1, plain AdamW, global batch 8."""
    run_dir = tmp_path_factory.mktemp("ref")
    return run_ranks(1, workers.train_run, [*STEPS, f"run_dir={run_dir}", "data.micro_batch_size=8"])[0]


def test_data_parallel_matches_single_process_loss_trajectory(reference, tmp_path):
    ranks = run_ranks(2, workers.train_run, [*STEPS, f"run_dir={tmp_path}", "data.micro_batch_size=4"])
    for step, loss in reference["losses"].items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert _max_abs_diff(reference["params"], ranks[0]["params"]) < 1e-5


@pytest.mark.parametrize("stage", [0, 1])
def test_logged_gradient_norm_is_the_single_process_one_at_every_zero_stage(reference, tmp_path, stage):
    """The norm before clipping, over the whole data-parallel batch: DeepSpeed drops it at ZeRO 0 (its plain
    optimizer path), where the engine keeps the value DeepSpeed's clipping computes."""
    ranks = run_ranks(2, workers.train_run, [*STEPS, f"run_dir={tmp_path}", "data.micro_batch_size=4",
                                             f"parallel.zero_stage={stage}"])
    assert sorted(reference["grad_norms"]) == [1, 2, 3, 4, 5]
    for step, norm in reference["grad_norms"].items():
        assert norm > 0.5  # clipping is active in these steps, so the logged norm must be the one before it
        assert ranks[0]["grad_norms"][step] == pytest.approx(norm, rel=1e-5), step


def test_p_pots_proposal_is_identical_on_every_rank_and_equals_single_process(tmp_path):
    """The time proposal's statistics are reduced over all ranks: DP=2 holds DP=1's proposal on both ranks."""
    p_pots = ["objective=mdm_ls", "objective.t_sampler=p_pots", "objective.p_pots_bins=4",
              "objective.mask_pairs=mirror", "objective.score_baseline=time_binned"]
    single = run_ranks(1, workers.train_run, [*STEPS, *p_pots, f"run_dir={tmp_path / 'one'}",
                                              "data.micro_batch_size=8"])[0]
    ranks = run_ranks(2, workers.train_run, [*STEPS, *p_pots, f"run_dir={tmp_path / 'two'}",
                                             "data.micro_batch_size=4"])
    first, second = (r["time_sampler"] for r in ranks)
    for key in ("count", "loss_sum", "square_sum"):
        assert torch.equal(first[key], second[key]), key
        assert torch.allclose(first[key], single["time_sampler"][key], rtol=1e-6), key
    assert (first["count"] > 0).all()
    for step, loss in single["losses"].items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5), step


def test_zero_keeps_the_schedule_learning_rate_group(tmp_path):
    """optimizer.schedule_lr_mult gives LoMDM's scheduler heads their own AdamW group: ZeRO 1 over two ranks
    trains them like the single process does, and the multiple changes them (the check above can fail).

    The heads' output biases are left out of the comparison: the exponents are centred over positions
    (schedules.base.normalized_exponents), so their gradient is exactly zero and Adam turns round-off into
    updates of about +-lr (the same effect as in `_max_abs_diff`, measured 2e-4 at lr 1e-3 with or without ZeRO).
    Adam's eps is 1e-6, not 1e-8, for the same reason: with the heads' zero-initialised output layer some first-layer
    weights get gradients of round-off size, and at eps 1e-8 their updates differed by 1e-4 between the two
    reduction orders on an AVX-512 AMD EPYC (2e-6 at eps 1e-6; below 1e-5 on the earlier machines at 1e-8)."""
    lomdm = [*STEPS, "objective=lomdm", "optimizer.eps=1e-6"]
    single = run_ranks(1, workers.train_run, [*lomdm, "optimizer.schedule_lr_mult=10", f"run_dir={tmp_path / 'one'}",
                                              "data.micro_batch_size=8"])[0]
    ranks = run_ranks(2, workers.train_run, [*lomdm, "optimizer.schedule_lr_mult=10", f"run_dir={tmp_path / 'two'}",
                                             "data.micro_batch_size=4", "parallel.zero_stage=1"])
    plain = run_ranks(1, workers.train_run, [*lomdm, f"run_dir={tmp_path / 'plain'}", "data.micro_batch_size=8"])[0]
    centred = {n: p for n, p in single["params"].items() if not n.endswith("_scheduler.net.2.bias")}
    assert len(centred) == len(single["params"]) - 2  # the forward and the backward head
    assert _max_abs_diff(centred, ranks[0]["params"]) < 1e-5
    heads = {n: p for n, p in centred.items() if ".scheduler_heads." in n}
    assert heads and _max_abs_diff(heads, plain["params"]) > 1e-3
    # The schedule's gradient norm is measured over the whole model (after the DP reduction, from ZeRO's partitions).
    assert sorted(ranks[0]["schedule_norms"]) == [1, 2, 3, 4, 5]
    for step, norm in single["schedule_norms"].items():
        assert ranks[0]["schedule_norms"][step] == pytest.approx(norm, rel=1e-5), step


@pytest.fixture(scope="module")
def schedule_clip_reference(tmp_path_factory):
    """LoMDM on one process with the schedule's gradient clipped on its own (small clips, so both are active).
    AdamW divides a gradient's scale out (its first update is sign(g) whatever the clip), so eps=1 makes the update
    about lr x the clipped gradient: the comparison with the shared clip below can then fail."""
    root = tmp_path_factory.mktemp("split")
    lomdm = [*STEPS, "objective=lomdm", "optimizer.grad_clip=0.05", "optimizer.eps=1.0", "optimizer.lr=0.1"]
    single = run_ranks(1, workers.train_run, [*lomdm, "optimizer.schedule_grad_clip=0.01", f"run_dir={root / 'one'}",
                                              "data.micro_batch_size=8"])[0]
    shared = run_ranks(1, workers.train_run, [*lomdm, f"run_dir={root / 'shared'}", "data.micro_batch_size=8"])[0]
    return lomdm, single, shared


@pytest.mark.parametrize("stage", [0, 2])
def test_split_schedule_clip_matches_single_process_at_every_zero_stage(schedule_clip_reference, tmp_path, stage):
    """optimizer.schedule_grad_clip over two data-parallel ranks: ZeRO 0 clips in DeepSpeed's clip_fp32_gradients,
    ZeRO 2 in its partition update (parallel/engine.py); both train like the single process, log its global norm and
    its schedule norm, and the schedule's heads differ from a shared clip's (so the comparison can fail). The centred heads' output
    biases are left out, as in the test above."""
    lomdm, single, shared = schedule_clip_reference
    ranks = run_ranks(2, workers.train_run, [*lomdm, "optimizer.schedule_grad_clip=0.01", f"run_dir={tmp_path}",
                                             "data.micro_batch_size=4", f"parallel.zero_stage={stage}"])
    centred = {n: p for n, p in single["params"].items() if not n.endswith("_scheduler.net.2.bias")}
    assert _max_abs_diff(centred, ranks[0]["params"]) < 1e-5
    for key in ("grad_norms", "schedule_norms"):  # the schedule's norm too: ZeRO 2 keeps no .grad to read it from
        assert single[key] and ranks[0][key].keys() == single[key].keys(), key
        for step, norm in single[key].items():
            assert ranks[0][key][step] == pytest.approx(norm, rel=1e-5), (key, step)
    heads = {n: p for n, p in centred.items() if ".scheduler_heads." in n}
    assert heads and _max_abs_diff(heads, shared["params"]) > 1e-4  # measured 8e-4, against 1e-5 above


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_single_process_adamw_and_halves_optimizer_state(reference, tmp_path, stage):
    ranks = run_ranks(2, workers.train_run, [*STEPS, f"run_dir={tmp_path}", "data.micro_batch_size=4",
                                             f"parallel.zero_stage={stage}"])
    assert _max_abs_diff(reference["params"], ranks[0]["params"]) < 1e-5
    for r in ranks:
        assert r["adam_state_numel"] == pytest.approx(reference["adam_state_numel"] / 2, rel=0.02)


def test_zero_with_megatron_mpu_at_tp2_dp2_matches_tp1_dp1(reference, tmp_path):
    ranks = run_ranks(4, workers.train_run, [*STEPS, f"run_dir={tmp_path}", "data.micro_batch_size=4",
                                             "parallel.zero_stage=1", "parallel.tensor_parallel=2"])
    for step, loss in reference["losses"].items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert _max_abs_diff(reference["params"], ranks[0]["params"]) < 1e-5


@pytest.mark.parametrize("layout", [["parallel.tensor_parallel=2", "data.micro_batch_size=8"],
                                    ["parallel.zero_stage=2", "data.micro_batch_size=4"]],
                         ids=["tp2", "dp2_zero2"])
def test_sharded_checkpoint_resume_equals_uninterrupted_run(tmp_path, layout):
    common = [*STEPS, "train.steps=6", *layout]
    full = run_ranks(2, workers.train_run, [*common, f"run_dir={tmp_path / 'full'}"])
    first = run_ranks(2, workers.train_run, [*common, f"run_dir={tmp_path / 'split'}", "train.stop_at=3"])
    assert sorted(first[0]["losses"]) == [1, 2, 3]
    resumed = run_ranks(2, workers.train_run, [*common, f"run_dir={tmp_path / 'split'}"])
    assert sorted(resumed[0]["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[0]["losses"][step] == pytest.approx(full[0]["losses"][step], rel=1e-6), step


def test_data_parallel_checkpoint_holds_one_copy_of_the_weights(tmp_path):
    """DP = 4 with ZeRO 1: one model file (the weights once, measured in bytes), one optimizer file (the Adam
    moments once, per parameter, gathered from the four ZeRO partitions), and every rank's own trainer state."""
    ranks = run_ranks(4, workers.train_run, [*STEPS, "train.steps=2", f"run_dir={tmp_path}",
                                             "data.micro_batch_size=2", "parallel.zero_stage=1"])
    checkpoint = Path(ranks[0]["checkpoint"])
    names = sorted(p.name for p in checkpoint.iterdir())
    assert [n for n in names if n.startswith("model-")] == ["model-tp0-pp0.safetensors"]
    assert [n for n in names if n.startswith("optimizer-")] == ["optimizer-tp0-pp0.safetensors"]
    assert [n for n in names if n.startswith("trainer-")] == [f"trainer-tp0-pp0-dp{d}.pt" for d in range(4)]
    weight_bytes = sum(t.numel() * t.element_size() for t in ranks[0]["params"].values())
    on_disk = (checkpoint / "model-tp0-pp0.safetensors").stat().st_size
    assert weight_bytes <= on_disk < weight_bytes * 1.05 + 16384, (on_disk, weight_bytes)
    assert all(r["params"].keys() == ranks[0]["params"].keys() for r in ranks)  # every rank loads the one copy


def test_zero_stage_one_trains_in_a_lone_process(dims, tmp_path, monkeypatch):
    """`python launchers/local.py parallel.zero_stage=1` without torchrun: no LOCAL_RANK in the environment
    (DeepSpeed used to fail on it)."""
    from mdm_scale.config import load_config
    from mdm_scale.train import train

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = load_config("tiny", [*workers.SMALL, *STEPS, "train.steps=2", f"run_dir={tmp_path}",
                               "data.micro_batch_size=4", "parallel.zero_stage=1"])
    result = train(cfg)
    assert sorted(result.losses) == [1, 2] and all(v == v for v in result.losses.values())


@pytest.mark.parametrize("layout", [["parallel.tensor_parallel=2"],
                                    ["parallel.pipeline_parallel=2", "parallel.zero_stage=1",
                                     "model.num_layers=4", "model.tie_embeddings=false"]], ids=["tp2", "pp2_zero1"])
def test_learned_schedule_clip_and_norms_on_model_parallel_layouts(tmp_path, layout):
    """LoMDM with an active shared clip on TP = 2 (DeepSpeed's ZeRO 0 clip, shards counted once over the model-
    parallel group) and PP = 2 with ZeRO 1 (megatron's schedule runs the backward, DeepSpeed's partitions clip):
    the same losses, global norm and schedule norm as one process (parallel/clipping.py)."""
    common = [*STEPS, "objective=lomdm", "optimizer.grad_clip=0.05", "data.micro_batch_size=4",
              *[o for o in layout if o.startswith("model.")]]
    single = run_ranks(1, workers.train_run, [*common, f"run_dir={tmp_path / 'one'}"])[0]
    ranks = run_ranks(2, workers.train_run, [*common, *layout, f"run_dir={tmp_path / 'two'}"])
    assert max(single["grad_norms"].values()) > 0.05  # the clip is active, so the norms decide the update
    for key in ("losses", "grad_norms", "schedule_norms"):
        last = ranks[-1][key]  # the last pipeline stage holds the loss
        assert single[key] and last.keys() == single[key].keys(), key
        for step, value in single[key].items():
            assert last[step] == pytest.approx(value, rel=1e-5), (key, step)
