"""Tensor parallelism on real gloo processes: TP=2 gives TP=1's loss and gradients for every objective."""

from __future__ import annotations

import pytest
import torch

from tests.parallel import workers
from tests.spawn import run_ranks

OBJECTIVES = ["mdlm", "ar", "block", "mdm_ls", "lomdm", "lomdm+documents"]  # +documents: packed, masked


@pytest.fixture(scope="module")
def single_and_tensor_parallel():
    return run_ranks(1, workers.nelbo_gradients, OBJECTIVES, 1)[0], run_ranks(2, workers.nelbo_gradients, OBJECTIVES, 2)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_tensor_parallel_matches_single_process(single_and_tensor_parallel, objective):
    ref = single_and_tensor_parallel[0][objective]
    tp = [rank[objective] for rank in single_and_tensor_parallel[1]]
    for rank in tp:
        assert rank["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert rank["nelbo"] == pytest.approx(ref["nelbo"], rel=1e-5)
    checked = 0
    # Some gradients are analytically zero (the K bias under softmax shift invariance, the forward scheduler's
    # output bias under NormSig's centring): compare those to the overall gradient scale, not their own.
    overall = max(g.abs().max().item() for g in ref["grads"].values() if g is not None)
    for name, g_ref in ref["grads"].items():
        g = tp[0]["grads"][name]
        if g_ref is None:
            assert g is None, name
            continue
        assert g.shape == g_ref.shape, name
        tolerance = 1e-5 * g_ref.abs().max().item() + 1e-7 * overall
        assert (g - g_ref).abs().max().item() <= tolerance, name
        assert torch.equal(tp[1]["grads"][name], g), name  # both TP ranks see the same full gradient
        checked += 1
    assert checked >= 10


def test_a_lone_torchrun_worker_meets_its_agent_store(tmp_path):
    """`torchrun --nproc-per-node=1` serves the rendezvous store from its agent at MASTER_PORT
    (TORCHELASTIC_USE_AGENT_STORE): init_distributed must join it, not move to a private port, where the worker
    waited 30 minutes for a store nobody serves (bench/scaling.py's 1-rank layout did)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "worker.py"
    script.write_text("from parallel.distributed import init_distributed\n"
                      "dims = init_distributed(device='cpu')\nprint('joined', dims.world_size, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                             str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=root, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the lone torchrun worker did not join its agent's store within 180 s")
    assert proc.returncode == 0 and "joined 1" in out, out[-2000:]
