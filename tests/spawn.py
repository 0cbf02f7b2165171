"""Run a function on N real processes (gloo, torch.distributed env vars), as torchrun would, and collect results.

Workers live in importable modules (tests/parallel/workers.py) so the spawn start method can find them.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      WANDB_MODE="offline", WANDB_SILENT="true")
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # Shut gloo down before interpreter teardown: its threads otherwise race the exit and, rarely, abort the
    # process ("terminate called without an active exception") after the work is done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 600):
    """Call fn(rank, *args) on `world_size` processes; returns the list of their return values (rank order)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as e:
            errors = "\n".join(p.read_text() for p in Path(out_dir).glob("*.err"))
            raise RuntimeError(f"a rank failed:\n{errors or e}") from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
