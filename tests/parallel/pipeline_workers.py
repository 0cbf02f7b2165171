"""Rank functions for the pipeline-parallel tests (importable by the spawn start method)."""

from __future__ import annotations

import torch

from tests.parallel.workers import SMALL, packed_documents

PP_MODEL = [*SMALL, "model.num_layers=4", "model.tie_embeddings=false"]


def pipeline_gradients(rank: int, objectives: list[str], pipeline_parallel: int, reference: dict | None) -> dict:
    """Per objective: micro-batch losses (last stage) and gradients by global parameter name, from one pipelined
    NELBO step over 4 micro-batches. With `reference` (the PP = 1 result) each stage loads those weights."""
    from mdm_scale.config import load_config
    from mdm_scale.pipeline import pipeline_nelbo
    from mdm_scale.model import build_model
    from parallel.consolidate import model_layout
    from parallel.distributed import init_distributed

    dims = init_distributed(pipeline_parallel=pipeline_parallel, device="cpu", seed=0)
    out = {}
    for name in objectives:
        objective, _, documents = name.partition("+")  # "lomdm+documents": packed documents with a mask
        cfg = load_config("tiny", [*PP_MODEL, f"objective={objective}"])
        torch.manual_seed(0)
        model = build_model(cfg, 97, dims)
        denoiser, schedule = model["denoiser"], model["schedule"]
        names = {n: place.global_name for n, place in model_layout(model).items()}
        with torch.no_grad():
            if reference is None:  # move zero-initialised heads and logits off zero
                g = torch.Generator().manual_seed(1)
                for n, p in model.named_parameters():
                    if "scheduler_heads" in n or "position_logits" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                for n, p in model.named_parameters():
                    p.copy_(reference[name]["weights"][names[n]])
        batches = [torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
        documents_ids = [packed_documents(4, 16)] * len(batches) if documents else None
        terms = pipeline_nelbo(denoiser, schedule, batches, cfg.objective, torch.Generator().manual_seed(3),
                               document_ids=documents_ids)
        losses = [x.nelbo.item() for x in terms]
        out[name] = {
            "losses": losses,
            "grads": {names[n]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "weights": {names[n]: p.detach().clone() for n, p in model.named_parameters()},
        }
    return out
