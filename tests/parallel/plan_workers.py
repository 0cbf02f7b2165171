"""Rank functions for tests/parallel/test_plan.py (importable, so the spawn start method finds them)."""

from __future__ import annotations

from tests.parallel.workers import SMALL

PLAN_MODEL = [*SMALL, "model.num_layers=4", "objective.schedule.scheduler_layers=1"]


def shard_sizes(rank: int, objectives: list[str]) -> dict:
    """{objective: {"tp2": parameters of this rank at TP = 2, "pp2": at PP = 2}} of models built as training does."""
    import torch

    from mdm_scale.config import load_config
    from mdm_scale.model import build_model
    from parallel.distributed import init_distributed

    out = {}
    for layout in ("tp2", "pp2"):
        tp, pp = (2, 1) if layout == "tp2" else (1, 2)
        dims = init_distributed(tensor_parallel=tp, pipeline_parallel=pp, device="cpu", seed=0)
        for objective in objectives:
            cfg = load_config("tiny", [*PLAN_MODEL, f"objective={objective}", "model.tie_embeddings=false",
                                       f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}"])
            torch.manual_seed(0)
            model = build_model(cfg, 257, dims)
            out.setdefault(objective, {})[layout] = sum(p.numel() for p in model.parameters())
    return out
