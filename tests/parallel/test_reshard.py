"""Resuming on another parallel layout (TP 2 <-> 1, PP 2 <-> 1, DP 4 <-> 2 with ZeRO): weights, AdamW moments, step
counts, LR schedule and trainer state carry over.

Each layout test trains layout A for 5 steps without interruption (checkpoints at 2 and 4), resumes layout B from
A's step 2 for steps 3-4, and A again from B's step 4 for step 5. TP, PP and DP compute the same math as one
process (test_distributed/test_pipeline/test_engine), so the resumed losses must be A's to 1e-6: step 3's loss
checks the weights, step 4's the optimizer state and LR schedule that step 3 applied, step 5 the way back. The
checks can fail: B resumed from a copy whose second moments are scaled by 4 has A's step-3 loss but not its
step-4 loss; and B re-saving the state it loaded (stop_at = the checkpoint's step) must consolidate to A's
checkpoint bit for bit (weights, moments, steps, LR schedule, data position, noise and time-sampler state).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parallel.checkpoint import CheckpointError, load_checkpoint, nearest_shard, save_checkpoint
from parallel.consolidate import RankLayout, consolidate, read_tensors
from tests.parallel import reshard_workers
from tests.parallel.pipeline_workers import PP_MODEL
from tests.spawn import _free_port, run_ranks

COMMON = ["train.steps=5", "optimizer.lr=1e-3", "optimizer.warmup_steps=1", "optimizer.grad_clip=0.5",
          "checkpoint.every=2", "checkpoint.keep=0"]
TOLERANCE = 1e-6


def _phases(a: list[str], a_world: int, b: list[str], b_world: int, *, perturb: bool = False) -> list[dict]:
    phases = [
        {"run": "a", "world": a_world, "overrides": a},  # the uninterrupted run on layout A
        {"run": "b", "world": b_world, "overrides": [*b, "train.stop_at=4"], "start": ["a", 2]},
        {"run": "back", "world": a_world, "overrides": a, "start": ["b", 4]},
        # re-saves at once what layout B loaded
        {"run": "b_exact", "world": b_world, "overrides": [*b, "train.stop_at=2"], "start": ["a", 2]},
    ]
    if perturb:
        phases.append({"run": "b_perturbed", "world": b_world, "overrides": [*b, "train.stop_at=4"],
                       "start": ["a", 2], "scale_exp_avg_sq": 4.0})
    for phase in phases:
        phase["port"] = _free_port()
    return phases


def _run(world: int, phases: list[dict], root: Path) -> dict[str, dict]:
    ranks = run_ranks(world, reshard_workers.run_phases, phases, str(root))
    return {phase["run"]: ranks[0][i] for i, phase in enumerate(phases)}


def _optimizer_header(checkpoint: str) -> dict:
    """Steps (merged over places) and LR schedule recorded in the optimizer files' headers."""
    merged = {"steps": {}}
    for path in sorted(Path(checkpoint).glob("optimizer-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["optimizer"])
        merged["steps"].update(header.pop("steps"))
        merged.update(header)
    return merged


def _check_resumed_losses(runs: dict[str, dict]) -> None:
    reference = runs["a"]["losses"]
    assert sorted(reference) == [1, 2, 3, 4, 5] and sorted(runs["b"]["losses"]) == [3, 4]
    for step in (3, 4):
        assert runs["b"]["losses"][step] == pytest.approx(reference[step], rel=TOLERANCE), step
    assert sorted(runs["back"]["losses"]) == [5]
    assert runs["back"]["losses"][5] == pytest.approx(reference[5], rel=TOLERANCE)


def _check_exact_state(a_checkpoint: str, b_checkpoint: str) -> None:
    """The state layout B loaded (and saved again, untouched) is layout A's, bit for bit."""
    assert Path(b_checkpoint).name == Path(a_checkpoint).name
    for kind in ("model", "optimizer"):
        a, b = consolidate(a_checkpoint, kind), consolidate(b_checkpoint, kind)
        assert set(a) == set(b) and a, kind
        for name in a:
            assert torch.equal(a[name], b[name]), name
    moments = consolidate(a_checkpoint, "optimizer")
    assert {n.split("/")[0] for n in moments} == {"exp_avg", "exp_avg_sq"}
    assert _optimizer_header(a_checkpoint) == _optimizer_header(b_checkpoint)
    assert set(_optimizer_header(a_checkpoint)["steps"].values()) == {2.0}
    a_trainer = next(iter(reshard_workers.trainer_states(a_checkpoint).values()))
    for state in reshard_workers.trainer_states(b_checkpoint).values():
        assert state["step"] == a_trainer["step"] == 2
        for key in ("epoch", "sample_offset"):  # global samples consumed: the same for any layout
            assert state["data"][key] == a_trainer["data"][key], key
        assert torch.equal(state["noise_rng"], a_trainer["noise_rng"])  # drawn for the global batch on every rank
        assert _same(state["time_sampler"], a_trainer["time_sampler"])  # reduced over all ranks: layout-free


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_tensor_parallel_2_to_1_and_back(tmp_path):
    """TP = 2 (DeepSpeed, ZeRO 0) -> TP = 1 (plain AdamW) -> TP = 2; a perturbed second moment is seen."""
    a = [*COMMON, "parallel.tensor_parallel=2", "data.micro_batch_size=8"]
    b = [*COMMON, "data.micro_batch_size=8"]
    runs = _run(2, _phases(a, 2, b, 1, perturb=True), tmp_path)
    _check_resumed_losses(runs)
    _check_exact_state(str(tmp_path / "a/checkpoints/step_00000002"), runs["b_exact"]["checkpoint"])
    reference, perturbed = runs["a"]["losses"], runs["b_perturbed"]["losses"]
    assert perturbed[3] == pytest.approx(reference[3], rel=TOLERANCE)  # same weights
    assert abs(perturbed[4] - reference[4]) > 100 * TOLERANCE * reference[4]  # other moments: another update


def test_pipeline_parallel_2_to_1_and_back(tmp_path):
    """PP = 2 (megatron's schedule, DeepSpeed ZeRO 1) -> PP = 1 (plain AdamW) -> PP = 2."""
    common = [*COMMON, *PP_MODEL[len(reshard_workers.SMALL):], "data.micro_batch_size=2", "data.grad_accumulation=4"]
    a = [*common, "parallel.pipeline_parallel=2", "parallel.zero_stage=1"]
    runs = _run(2, _phases(a, 2, common, 1), tmp_path)
    _check_resumed_losses(runs)
    _check_exact_state(str(tmp_path / "a/checkpoints/step_00000002"), runs["b_exact"]["checkpoint"])


def test_data_parallel_4_to_2_and_back_across_zero_partitions(tmp_path):
    """DP = 4 with ZeRO 1 -> DP = 2 with ZeRO 2 -> DP = 4 with ZeRO 1, the global batch kept (2 x 4 = 4 x 2):
    the ZeRO partitions differ at every change, the per-parameter state does not."""
    a = [*COMMON, "data.micro_batch_size=2", "parallel.zero_stage=1"]
    b = [*COMMON, "data.micro_batch_size=4", "parallel.zero_stage=2"]
    runs = _run(4, _phases(a, 4, b, 2), tmp_path)
    _check_resumed_losses(runs)
    _check_exact_state(str(tmp_path / "a/checkpoints/step_00000002"), runs["b_exact"]["checkpoint"])


def test_split_tensors_are_cut_for_any_tensor_parallel_size(tmp_path):
    """read_tensors rebuilds a TP-split tensor from its saved ranks and cuts it for the reading rank; replicated
    tensors and optimizer moments (`<key>/<name>`) follow the same partition dims."""
    full = torch.arange(24.0).reshape(4, 6)
    dims = json.dumps({"w": 1, "b": -1})
    for tp, part in enumerate(full.chunk(2, dim=1)):
        save_file({"w": part.contiguous(), "b": torch.ones(3)}, tmp_path / f"model-tp{tp}-pp0.safetensors",
                  metadata={"tp_partition_dims": dims})
        save_file({"exp_avg/w": -part.contiguous()}, tmp_path / f"optimizer-tp{tp}-pp0.safetensors",
                  metadata={"tp_partition_dims": dims})
    assert torch.equal(read_tensors(tmp_path)["w"], full)
    for size in (1, 2, 3):
        for rank in range(size):
            got = RankLayout({"w": 1, "b": -1}, rank, size).read(tmp_path, "model")
            assert torch.equal(got["w"], full.chunk(size, dim=1)[rank]) and torch.equal(got["b"], torch.ones(3))
            moments = RankLayout({"w": 1}, rank, size).read(tmp_path, "optimizer")
            assert torch.equal(moments["exp_avg/w"], -full.chunk(size, dim=1)[rank])
    with pytest.raises(CheckpointError, match="not divisible by tensor_parallel=4"):
        RankLayout({"w": 1}, 0, 4).read(tmp_path, "model")


def test_trainer_state_of_a_missing_rank_comes_from_the_nearest_one():
    saved = [f"tp{t}-pp0-dp{d}" for t in range(2) for d in range(2)]
    assert nearest_shard("tp1-pp0-dp1", saved) == "tp1-pp0-dp1"
    assert nearest_shard("tp1-pp0-dp3", saved) == "tp1-pp0-dp0"
    assert nearest_shard("tp3-pp1-dp0", saved) == "tp0-pp0-dp0"
    assert nearest_shard("tp0-pp0-dp0", []) is None


def test_opaque_optimizer_state_of_another_layout_is_refused_clearly(tmp_path):
    """Checkpoints from before per-parameter moments hold ZeRO partitions or torch state dicts keyed by index:
    meaningless on another layout, so they load only where they were written."""
    path = save_checkpoint(tmp_path, 3, model={"w": torch.ones(2)}, optimizer={"optimizer": {}, "lr": 1.0},
                           trainer={"step": 3}, shard="tp0-pp0-dp0", optimizer_replicated=False)
    assert load_checkpoint(path, "tp0-pp0-dp0", reshard=RankLayout({"w": -1})).optimizer["lr"] == 1.0
    with pytest.raises(CheckpointError, match="resume it on that layout once"):
        load_checkpoint(path, "tp0-pp0-dp1", reshard=RankLayout({"w": -1}))
