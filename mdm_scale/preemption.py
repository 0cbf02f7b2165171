"""Stop at a step boundary when the scheduler asks (preemption, the time limit), after a checkpoint.

SLURM sends SIGUSR1 (`#SBATCH --signal=USR1@90`) before a time limit or a preemption. A signal can arrive at
any point of a step, on some ranks only, and a checkpoint needs every rank, so the handler only records the
signal; the training loop asks `StopRequest.agreed()` once per step (an all-reduce of one flag, like Megatron's
DistributedSignalHandler), and when any rank has been signalled all ranks checkpoint and return together.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Records scheduler signals; `agreed()` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Callable | int | None] = {}

    def install(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> StopRequest:
        """Handle `signals` in this (main) thread, remembering the handlers they replace (e.g. submitit's)."""
        for sig in signals:
            self.previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame) -> None:
        self.signum = signum

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank has been signalled (a collective: call it on all ranks)."""
        flag = torch.tensor([0 if self.signum is None else 1], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
