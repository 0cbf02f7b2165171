"""Consolidating a sharded checkpoint gives the full weights, loadable into any other layout."""

from __future__ import annotations

import torch

from parallel.consolidate import consolidate
from tests.parallel import workers
from tests.spawn import run_ranks


def test_tensor_parallel_checkpoint_consolidates_to_the_full_weights(tmp_path):
    ranks = run_ranks(2, workers.train_run, ["train.steps=2", "parallel.tensor_parallel=2",
                                             f"run_dir={tmp_path}", "data.micro_batch_size=4"])
    full = consolidate(ranks[0]["checkpoint"])
    gathered = ranks[0]["params"]  # all-gathered from the live TP=2 model
    assert set(gathered) <= set(full)
    for name, tensor in gathered.items():
        assert torch.equal(full[name], tensor), name
    split = [n for n in gathered if gathered[n].shape != ranks[0]["shard_shapes"][n]]
    assert len(split) >= 5, "tensors were not actually split across the two TP ranks"
