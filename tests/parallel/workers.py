"""Functions run on every rank by tests/spawn.py (importable, so the spawn start method finds them)."""

from __future__ import annotations

import torch
import torch.distributed as dist

SMALL = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.scheduler_head_size=16",
    "data.seq_len=16", "data.source=committed", "data.tokenizer=byte", "logging.wandb=false",
    "logging.progress=false", "train.eval_batches=1", "train.eval_every=0", "sampling.num_samples=0",
    "objective.schedule.block_size=4",
]


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """Gather a tensor-parallel shard into the full tensor (replicated tensors are returned as they are)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach().clone()
    parts = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The TP = 1 shape of a (possibly tensor-parallel) parameter."""
    from megatron.core import parallel_state

    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return tuple(shape)


def shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of `full` (the TP = 1 tensor) for `param`: every layout then holds the same values
    (LoMDM-paper schedulers have TP-split transformer layers)."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    parts = full.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=param.partition_dim)
    return parts[parallel_state.get_tensor_model_parallel_rank()]


def nelbo_gradients(rank: int, objectives: list[str], tensor_parallel: int) -> dict:
    """{objective: loss and full gradients of one training estimate on a fixed batch with fixed noise}."""
    return {objective: _nelbo_gradients(objective, tensor_parallel) for objective in objectives}


def packed_documents(batch_size: int, seq_len: int) -> torch.Tensor:
    """[b, l] document ids of sequences packing three documents each, with boundaries varying by row; odd rows end
    in two positions of padding (no loss)."""
    from data_pipeline.shard_format import PADDING_DOCUMENT_ID

    positions = torch.arange(seq_len)[None, :]
    cuts = torch.tensor([[3 + r, 9 + r] for r in range(batch_size)])  # [b, 2]
    ids = (positions >= cuts[:, :1]).long() + (positions >= cuts[:, 1:]).long()
    ids[1::2, -2:] = PADDING_DOCUMENT_ID
    return ids


def _nelbo_gradients(objective: str, tensor_parallel: int) -> dict:
    from mdm_scale.config import load_config
    from mdm_scale.objective import training_nelbo
    from mdm_scale.model import build_model
    from parallel.distributed import init_distributed

    dims = init_distributed(tensor_parallel=tensor_parallel, device="cpu", seed=0)
    objective, _, documents = objective.partition("+")  # "lomdm+documents": packed documents with a mask
    cfg = load_config("tiny", [*SMALL, f"objective={objective}"])
    torch.manual_seed(0)
    model = build_model(cfg, 97, dims)
    with torch.no_grad():  # move zero-initialised heads and logits off zero so every gradient is exercised
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "scheduler_heads" in name or "position_logits" in name:
                p.copy_(shard_of(torch.randn(full_shape(p), generator=g) * 0.5, p))
    x0 = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(2))
    terms = training_nelbo(model["denoiser"], model["schedule"], x0, cfg.objective, torch.Generator().manual_seed(3),
                           document_ids=packed_documents(8, 16) if documents else None)
    terms.loss.backward()
    grads = {n: full_tensor(p.grad) if p.grad is not None else None for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # full_tensor reads the sharding attributes from the parameter
        if p.grad is not None and getattr(p, "tensor_model_parallel", False):
            p.grad.tensor_model_parallel, p.grad.partition_dim = True, p.partition_dim
            grads[n] = full_tensor(p.grad)
    local_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # this rank's shard of each parameter
    return {"loss": terms.loss.item(), "nelbo": terms.nelbo.item(), "grads": grads, "local_shapes": local_shapes}


def train_run(rank: int, overrides: list[str]) -> dict:
    """train() with SMALL + overrides; returns losses, the full final parameters (from the checkpoint this rank
    wrote) and the number of optimizer-state elements this rank holds (Adam moments, ZeRO partitions) once an
    engine of this layout has loaded that checkpoint (the file holds every parameter's moments once per place)."""
    from megatron.core import parallel_state

    from mdm_scale.config import load_config
    from mdm_scale.metrics import read_metrics
    from mdm_scale.model import build_model
    from mdm_scale.train import build_training_engine, train
    from parallel.checkpoint import load_checkpoint
    from parallel.consolidate import model_layout, to_local
    from parallel.distributed import init_distributed
    from parallel.engine import safe_checkpoint_globals

    cfg = load_config("tiny", [*SMALL, *overrides])
    result = train(cfg)
    dims = init_distributed(tensor_parallel=cfg.parallel.tensor_parallel,
                            pipeline_parallel=cfg.parallel.pipeline_parallel, device="cpu", seed=0)
    shard = (f"tp{parallel_state.get_tensor_model_parallel_rank()}-"
             f"pp{parallel_state.get_pipeline_model_parallel_rank()}-dp{parallel_state.get_data_parallel_rank()}")
    ckpt = load_checkpoint(result.checkpoint, shard, safe_globals=safe_checkpoint_globals())
    model = build_model(cfg, 257, dims)
    layout = model_layout(model)
    model.load_state_dict(to_local(ckpt.model, layout))
    engine = build_training_engine(model, cfg, dims)
    engine.load_optimizer_state(ckpt.optimizer)
    zero = getattr(engine.optimizer, "single_partition_of_fp32_groups", None) is not None
    held = engine.optimizer.optimizer.state if zero else engine.optimizer.state  # ZeRO: this rank's partitions
    logged = read_metrics(cfg.run_dir)  # rank 0's log
    return {
        "losses": result.losses,
        "grad_norms": {m["step"]: m["train/grad_norm"] for m in logged if "train/grad_norm" in m},
        "schedule_norms": {m["step"]: m["train/grad_norm_schedule"] for m in logged
                           if "train/grad_norm_schedule" in m},
        "params": {layout[n].global_name: full_tensor(p) for n, p in model.named_parameters()},
        "shard_shapes": {layout[n].global_name: p.shape for n, p in model.named_parameters()},
        "adam_state_numel": _numel(dict(held)),
        "checkpoint": result.checkpoint,
        "time_sampler": ckpt.trainer["time_sampler"],
    }


def _numel(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_numel(v) for v in obj)
    return 0


def evaluate_run(rank: int, checkpoint: str, kwargs: dict) -> dict:
    """`python -m mdm_scale.evaluation`'s work on this rank (the result is all-reduced: equal on every rank)."""
    from mdm_scale.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, **kwargs)
