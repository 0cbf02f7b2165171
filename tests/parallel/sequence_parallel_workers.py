"""Rank functions for tests/parallel/test_sequence_parallel.py (importable for the spawn start method)."""

from __future__ import annotations

import torch

from tests.parallel.workers import SMALL, full_shape, full_tensor, packed_documents, shard_of


def nelbo_gradients(rank: int, cases: list[str], tensor_parallel: int, sequence_parallel: bool) -> dict:
    """{case: loss, full gradients, the number of parameters marked sequence-parallel and the positions the first
    block's norm saw}. A case is an objective, optionally "+documents" (packed, masked) or "+time"
    (a time-conditioned denoiser: its time embedding runs on sequence-sharded activations)."""
    return {case: _case(case, tensor_parallel, sequence_parallel) for case in cases}


def _full_grads(model) -> dict:
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is None:
            grads[n] = None
            continue
        if getattr(p, "tensor_model_parallel", False):  # full_tensor reads the sharding attributes
            p.grad.tensor_model_parallel, p.grad.partition_dim = True, p.partition_dim
        grads[n] = full_tensor(p.grad)
    return grads


def _case(case: str, tensor_parallel: int, sequence_parallel: bool) -> dict:
    from mdm_scale.config import load_config
    from mdm_scale.model import build_model
    from mdm_scale.objective import training_nelbo
    from parallel.distributed import init_distributed

    dims = init_distributed(tensor_parallel=tensor_parallel, device="cpu", seed=0)
    objective, *extras = case.split("+")
    overrides = [f"objective={objective}", f"parallel.tensor_parallel={tensor_parallel}",
                 f"parallel.sequence_parallel={str(sequence_parallel).lower()}", "model.dropout=0.0"]
    if "time" in extras:
        overrides.append("model.time_conditioning=true")
    cfg = load_config("tiny", [*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, 97, dims)
    with torch.no_grad():  # move zero-initialised heads, logits and time-embedding outputs off zero
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "scheduler_heads" in name or "position_logits" in name or "time_embedding.mlp.2" in name:
                p.copy_(shard_of(torch.randn(full_shape(p), generator=g) * 0.5, p))
    seen = []
    norm = model["denoiser"].decoder.layers[0].input_layernorm
    norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    x0 = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(2))
    terms = training_nelbo(model["denoiser"], model["schedule"], x0, cfg.objective, torch.Generator().manual_seed(3),
                           document_ids=packed_documents(8, 16) if "documents" in extras else None)
    terms.loss.backward()
    marked = sum(getattr(p, "sequence_parallel", False) for p in model.parameters())
    return {"loss": terms.loss.item(), "grads": _full_grads(model), "marked": marked, "norm_positions": seen[0]}
