"""Sequence parallelism on real gloo processes: TP=2 with parallel.sequence_parallel gives TP=1's loss and
gradients, the blocks really see half the positions, and training (ZeRO 0, 1 and 2) follows plain TP. The
sequence-sharded parameters' gradients are summed over TP by hooks (parallel/sequence_parallel.py); without
them every norm's gradient would hold only this rank's positions' share (disabling them makes these tests fail).
"""

from __future__ import annotations

import pytest
import torch

from mdm_scale.config import ConfigError, load_config
from tests.parallel import sequence_parallel_workers as workers
from tests.spawn import run_ranks

CASES = ["mdlm", "ar", "lomdm_paper", "lomdm+documents", "mdlm+time"]


@pytest.fixture(scope="module")
def single_and_sequence_parallel():
    return (run_ranks(1, workers.nelbo_gradients, CASES, 1, False)[0],
            run_ranks(2, workers.nelbo_gradients, CASES, 2, True))


@pytest.mark.parametrize("case", CASES)
def test_sequence_parallel_matches_single_process(single_and_sequence_parallel, case):
    ref = single_and_sequence_parallel[0][case]
    ranks = [r[case] for r in single_and_sequence_parallel[1]]
    assert ref["norm_positions"] == 16 and [r["norm_positions"] for r in ranks] == [8, 8]  # l / TP each
    overall = max(g.abs().max().item() for g in ref["grads"].values() if g is not None)
    checked = 0
    for rank in ranks:
        assert rank["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for name, g_ref in ref["grads"].items():
        g = ranks[0]["grads"][name]
        if g_ref is None:
            assert g is None, name
            continue
        tolerance = 2e-5 * g_ref.abs().max().item() + 1e-7 * overall  # fp32 sums in another order
        assert (g - g_ref).abs().max().item() <= tolerance, name
        assert torch.equal(ranks[1]["grads"][name], g), name
        checked += 1
    assert checked >= 10
    # Marked: 2 norms x (weight, bias) + 2 row-parallel biases per block, the final norm, the time embedding.
    assert ref["marked"] == 0 and ranks[0]["marked"] >= 2 * 6 + 2


def test_sequence_parallel_config_is_validated():
    with pytest.raises(ConfigError, match="needs parallel.tensor_parallel > 1"):
        load_config("tiny", ["parallel.sequence_parallel=true"])


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_training_with_sequence_parallelism_follows_tensor_parallelism(tmp_path, zero_stage):
    """The training loop sums the sequence-sharded gradients before DeepSpeed's step: 4 steps of TP=2 with and
    without sequence parallelism give the same losses, gradient norms and final weights."""
    from tests.parallel import workers as train_workers

    steps = ["train.steps=4", "optimizer.warmup_steps=0", "data.micro_batch_size=4", "parallel.tensor_parallel=2",
             f"parallel.zero_stage={zero_stage}"]
    plain = run_ranks(2, train_workers.train_run, [*steps, f"run_dir={tmp_path / 'tp'}"])[0]
    sp = run_ranks(2, train_workers.train_run, [*steps, "parallel.sequence_parallel=true",
                                                f"run_dir={tmp_path / 'sp'}"])[0]
    assert sorted(sp["losses"]) == [1, 2, 3, 4]
    for step, loss in plain["losses"].items():
        assert sp["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert sp["grad_norms"].keys() == plain["grad_norms"].keys() and plain["grad_norms"]
    for step, norm in plain["grad_norms"].items():
        assert sp["grad_norms"][step] == pytest.approx(norm, rel=1e-5), step
    assert max((sp["params"][k] - v).abs().max().item() for k, v in plain["params"].items()) < 1e-5
