"""Building the model and loading it from a checkpoint: the one place training, evaluation, sampling and export
get a model from, so none of them imports another.

    model = build_model(cfg, vocab_size, dims)                      # training (any TP x PP layout)
    cfg, tokenizer, model, dims = load_for_inference(checkpoint)    # evaluation, sampling (consolidated, eval mode)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from data_pipeline.tokenizer import load_tokenizer
from mdm_scale.config import RunConfig, load_config
from mdm_scale.denoiser import Denoiser
from mdm_scale.kernels import resolve_backend
from mdm_scale.schedules import build_schedule
from parallel.checkpoint import MANIFEST, CheckpointError, list_checkpoints
from parallel.consolidate import consolidate, model_layout, to_global, to_local
from parallel.distributed import ParallelDims, init_distributed
from parallel.sequence_parallel import sum_sequence_parallel_gradients


def build_model(cfg: RunConfig, vocab_size: int, dims: ParallelDims) -> nn.ModuleDict:
    """Denoiser (with LoMDM's scheduler heads when needed) and schedule, in one module for the optimizer.

    With PP > 1 the full model is initialised first and each stage keeps its blocks, so every layout starts from
    the weights PP = 1 would have (megatron would otherwise give each stage the RNG stream of stage 0). This
    costs one transient full copy per rank at start-up.
    """
    resolve_backend(cfg.kernels, dims.device)  # kernels=triton without a GPU (or Triton) fails here, not mid-step

    def build(pipeline_parallel: int) -> nn.ModuleDict:
        schedule = build_schedule(cfg.objective.schedule, max_seq_len=cfg.data.seq_len)
        heads = ("forward_scheduler", "backward_scheduler") if schedule.needs_clean_features else ()
        denoiser = Denoiser(
            cfg.model, vocab_size=vocab_size, max_seq_len=cfg.data.seq_len, scheduler_heads=heads,
            scheduler_layers=cfg.objective.schedule.scheduler_layers,
            scheduler_position_bias=cfg.objective.schedule.scheduler_position_bias,
            tensor_parallel_size=dims.tensor_parallel, pipeline_parallel_size=pipeline_parallel,
            on_gpu=dims.device.type == "cuda", kernels=cfg.kernels, causal=cfg.objective.causal,
            sequence_parallel=cfg.parallel.sequence_parallel, process_groups=dims.groups,
        )
        model = nn.ModuleDict({"denoiser": denoiser, "schedule": schedule})
        if cfg.parallel.sequence_parallel:
            sum_sequence_parallel_gradients(model)
        return model

    if dims.pipeline_parallel == 1:
        return build(1).to(dims.device)
    rng = torch.get_rng_state()
    full = build(1)
    full_state = to_global(full.state_dict(), model_layout(full))
    del full
    torch.set_rng_state(rng)
    stage = build(dims.pipeline_parallel)
    stage.load_state_dict(to_local(full_state, model_layout(stage)))
    return stage.to(dims.device)


def run_config_of(checkpoint: Path) -> RunConfig:
    """The resolved config a run wrote next to its checkpoints (<run_dir>/config.yaml)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / MANIFEST).exists():
        newest = list_checkpoints(checkpoint / "checkpoints") or list_checkpoints(checkpoint)
        hint = f"; its newest checkpoint is {newest[-1]}" if newest else ""
        raise CheckpointError(f"{checkpoint} is not a checkpoint directory (no {MANIFEST}){hint}")
    path = checkpoint.parent.parent / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the run's config.yaml is missing (a checkpoint is read with the config "
                                f"of the run that wrote it, in <run_dir>/config.yaml)")
    return load_config(path)


def load_for_inference(checkpoint: str | Path):
    """(run config, tokenizer, model ModuleDict{denoiser, schedule} in eval mode, ParallelDims): the checkpoint's
    weights consolidated into one full model on this rank (TP = PP = 1), for evaluation and sampling."""
    cfg = run_config_of(Path(checkpoint))
    cfg.parallel.tensor_parallel = cfg.parallel.pipeline_parallel = 1
    dims = init_distributed(device=cfg.train.device, seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, tokenizer.vocab_size, dims)
    model.load_state_dict(to_local(consolidate(checkpoint), model_layout(model)))
    return cfg, tokenizer, model.eval(), dims
