"""Golden values (megatron-core's functional-test habit): the first 5 training losses of a small run per objective,
stored in golden_losses.json and compared to 1e-6 relative, so a refactor that moves a number fails loudly.

    scripts/in_venv.sh python tests/mdm_scale/test_golden.py --update     # after a change that SHOULD move them

One intra-op thread while they run: CPU reductions may sum in another order with more threads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).with_name("golden_losses.json")
OBJECTIVES = ("mdlm", "ar", "block", "mdm_ls", "lomdm", "lomdm_paper")
CONFIG = ["data.source=committed", "data.tokenizer=byte", "data.seq_len=32", "data.micro_batch_size=8",
          "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.scheduler_head_size=16",
          "objective.schedule.block_size=8", "logging.wandb=false", "logging.progress=false",
          "train.eval_every=0", "train.eval_batches=1", "sampling.num_samples=0", "train.steps=5",
          "optimizer.warmup_steps=2", "train.device=cpu"]


def first_losses(objective: str, root: Path) -> list[float]:
    from mdm_scale.config import load_config
    from mdm_scale.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config("tiny", [*CONFIG, f"objective={objective}", f"run_dir={root / objective}",
                                   f"data.cache_dir={root / 'cache'}"])
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    return [result.losses[step] for step in range(1, 6)]


@pytest.fixture(scope="module")
def golden() -> dict[str, list[float]]:
    return json.loads(GOLDEN.read_text())


def test_golden_values_are_distinct_per_objective(golden):
    """The stored numbers are real runs: every objective present, and no two objectives share a curve."""
    assert set(golden) == set(OBJECTIVES) and all(len(v) == 5 for v in golden.values())
    assert len({tuple(v) for v in golden.values()}) == len(OBJECTIVES)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_first_five_losses_equal_the_golden_values(dims, tmp_path, golden, objective):
    assert first_losses(objective, tmp_path) == pytest.approx(golden[objective], rel=1e-6)


if __name__ == "__main__" and "--update" in sys.argv:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from parallel.distributed import init_distributed

    init_distributed(device="cpu", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        values = {o: first_losses(o, Path(tmp)) for o in OBJECTIVES}
    GOLDEN.write_text(json.dumps(values, indent=1) + "\n")
    print(json.dumps(values, indent=1))
