"""Helpers for the fault-injection tests (tests/parallel/test_faults.py): real 2-process runs of
launchers/local.py as torchrun would start them, and a rank function that poisons one training step with NaN."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# A tiny 2-rank (DP=2, DeepSpeed ZeRO 0) run that checkpoints after every step.
TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "data.seq_len=16",
    "data.micro_batch_size=4", "data.source=committed", "data.tokenizer=byte", "logging.wandb=false",
    "logging.progress=false", "logging.log_every=1", "train.eval_batches=1", "train.eval_every=0",
    "sampling.num_samples=0", "optimizer.lr=1e-3", "optimizer.warmup_steps=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(overrides: list[str], log: Path, world_size: int = 2) -> list[subprocess.Popen]:
    """Start `world_size` ranks of launchers/local.py, each in its own process group (so a kill takes any children
    with it); their output is appended to `log`.<rank>."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = open(f"{log}.{rank}", "ab")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "launchers" / "local.py"), "config=tiny",
                                       *overrides], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        out.close()
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every rank's whole process group, as a node failure or the OOM killer would."""
    import signal

    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def run_to_end(overrides: list[str], log: Path, timeout: float = 180) -> str:
    """Run all ranks to completion; returns rank 0's output. Raises with the logs when a rank fails."""
    procs = launch(overrides, log)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        kill(procs)
    outputs = [Path(f"{log}.{r}").read_text(errors="replace") for r in range(len(procs))]
    if any(codes):
        raise AssertionError(f"ranks exited with {codes}:\n" + "\n----\n".join(o[-3000:] for o in outputs))
    return outputs[0]


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """{shard/tensor name: tensor} of the newest complete checkpoint, every shard (read from safetensors)."""
    from safetensors.torch import load_file

    from parallel.checkpoint import list_checkpoints, verify_checkpoint

    newest = list_checkpoints(Path(run_dir) / "checkpoints")[-1]
    verify_checkpoint(newest)
    return {f"{f.name}/{k}": v for f in sorted(newest.glob("model-*.safetensors")) for k, v in load_file(f).items()}


def nonfinite_run(rank: int, overrides: list[str], poison_step: int, poison_rank: int) -> dict:
    """train() on this rank with the loss of optimizer step `poison_step` (one micro-batch per step) multiplied by
    NaN on rank `poison_rank` only, so its loss and gradients are NaN there. Test-only: the objective is wrapped in
    this process, nothing in the package knows about it."""
    import mdm_scale.train as train_module
    from mdm_scale.config import load_config

    original, calls = train_module.training_nelbo, [0]

    def poisoned(*args, **kwargs):
        terms = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == poison_step and rank == poison_rank:
            terms.loss = terms.loss * float("nan")
            terms.nelbo = terms.nelbo * float("nan")
        return terms

    train_module.training_nelbo = poisoned
    cfg = load_config("tiny", [*TINY, *overrides])
    try:
        result = train_module.train(cfg)
    except FloatingPointError as e:
        return {"error": str(e), "calls": calls[0]}
    finally:
        train_module.training_nelbo = original
    return {"losses": result.losses, "skipped": result.skipped, "checkpoint": result.checkpoint, "calls": calls[0]}
