"""Process-group setup from torchrun / SLURM environment variables, and megatron's model-parallel state.

One `ParallelDims` is built here once and passed down; nothing else reads rank globals.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # megatron-core is imported when processes start, not by the launchers that import this module
    from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True)
class ParallelDims:
    """The parallel layout of this job, as seen from this rank."""

    world_size: int
    rank: int
    local_rank: int
    tensor_parallel: int
    pipeline_parallel: int
    device: torch.device
    groups: ProcessGroupCollection | None = None
    """megatron-core's process groups of this rank (tp, pp, mp, dp); None for a model built without processes."""

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tensor_parallel_rank(self) -> int:
        return group_rank(self.groups, "tp")

    @property
    def pipeline_parallel_rank(self) -> int:
        return group_rank(self.groups, "pp")

    @property
    def data_parallel_rank(self) -> int:
        return group_rank(self.groups, "dp")


GROUP_NAMES = ["tp", "pp", "mp", "dp", "cp"]
"""The process groups the project and megatron-core's layers use, by ProcessGroupCollection names (cp: context
parallelism, size 1 here, which megatron's attention reads)."""


def current_process_groups() -> ProcessGroupCollection | None:
    """megatron-core's process groups (GROUP_NAMES) as its parallel_state holds them, or None before
    `initialize_model_parallel`. `init_distributed` puts them in ParallelDims; a module built without them (a test,
    a tool) takes these."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not parallel_state.model_parallel_is_initialized():
        return None
    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=GROUP_NAMES)


def group_rank(groups: ProcessGroupCollection | None, name: str) -> int:
    """This process's rank in group `name` (0 without groups)."""
    return 0 if groups is None else dist.get_rank(group=getattr(groups, name))


def group_size(groups: ProcessGroupCollection | None, name: str) -> int:
    """The size of group `name` (1 without groups)."""
    return 1 if groups is None else dist.get_world_size(group=getattr(groups, name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def world_size_from_env() -> int:
    """The job's number of processes as torchrun (WORLD_SIZE) or SLURM (SLURM_NTASKS) announce it; 1 alone."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def agree_on_error(error: str | None, *, name_rank: bool = True) -> str | None:
    """Collective over the world: the first error message of any rank, prefixed with its rank unless the message
    names its subject itself (None when every rank passed None), so that all ranks raise together; doubles as a
    barrier. A lone process returns `error`."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {r}: {e}" if name_rank else e for r, e in enumerate(errors) if e is not None), None)


def init_distributed(
    *, tensor_parallel: int = 1, pipeline_parallel: int = 1, device: str = "auto", seed: int = 0
) -> ParallelDims:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) and megatron's parallel state. Idempotent.

    Args:
        tensor_parallel: TP size; must divide the world size together with `pipeline_parallel`.
        pipeline_parallel: PP size.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        seed: seed of megatron's model-parallel RNG tracker (dropout inside TP regions).
    """
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda:
        from parallel import cpu_compat

        cpu_compat.apply()
        # x86 CPUs compute on subnormal floats (below 1.2e-38) ~100x slower, and a trained model's softmaxes make
        # them in quantity: a char_lm MDLM step at step 2500 ran 3.4x slower without this (bench/denormals.py).
        # Flushing them to zero changes nothing above 1.2e-38.
        torch.set_flush_denormal(True)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = world_size_from_env()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel x pipeline_parallel = "
            f"{tensor_parallel} x {pipeline_parallel}"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # A lone process has nobody to meet: a private port, whatever MASTER_* an enclosing launcher left behind;
        # except under torchrun, whose agent already serves the store at MASTER_PORT (a worker that moved away
        # from it waited 30 minutes for a store nobody serves).
        if world == 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=30),
        )
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel
            or parallel_state.get_pipeline_model_parallel_world_size() != pipeline_parallel
        ):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
        )
    mcore_tp.model_parallel_cuda_manual_seed(seed)
    return ParallelDims(world, rank, local_rank, tensor_parallel, pipeline_parallel, dev, current_process_groups())
