"""Rank function for the resharding tests: several training runs of different layouts in one spawn.

Starting 4 processes costs ~10 s of imports each on 2 cores, so a test spawns once and runs its phases (layout A,
then B on fewer ranks, then A again) one after another, each in its own process group on a fresh port; ranks a
phase does not use wait for the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from tests.parallel.workers import SMALL


def run_phases(rank: int, phases: list[dict], root: str) -> list[dict | None]:
    """Run each phase's training on ranks [0, phase["world"]); returns per phase its losses and checkpoint (None
    on ranks it did not use).

    A phase is {"world": ranks, "port": free port, "run": run name, "overrides": [...]} plus optionally
    "start": [run name, step]: the new run directory starts from a copy of that checkpoint (with this phase's
    config as its config.yaml: the layout differs, so it is a new run directory), and "scale_exp_avg_sq": a
    factor applied to every saved second moment of the copy (the manifest updated), to show the loss sees it.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mdm_scale.config import load_config, to_yaml
    from mdm_scale.train import train

    out = []
    for phase in phases:
        if rank >= phase["world"]:
            out.append(None)
            continue
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(phase["world"]),
                          MASTER_PORT=str(phase["port"]))
        run_dir = Path(root) / phase["run"]
        cfg = load_config("tiny", [*SMALL, *phase["overrides"], f"run_dir={run_dir}"])
        if rank == 0 and "start" in phase:
            source, step = phase["start"]
            copy = run_dir / "checkpoints" / f"step_{step:08d}"
            shutil.copytree(Path(root) / source / "checkpoints" / copy.name, copy)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            if "scale_exp_avg_sq" in phase:
                _scale_second_moments(copy, phase["scale_exp_avg_sq"])
        result = train(cfg)  # the other ranks wait for rank 0 in init_process_group, i.e. for the copy
        out.append({"losses": result.losses, "checkpoint": result.checkpoint})
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return out


def _scale_second_moments(checkpoint: Path, factor: float) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for path in checkpoint.glob("optimizer-*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) * (factor if k.startswith("exp_avg_sq/") else 1) for k in f.keys()}
        save_file(tensors, path, metadata=metadata)
        manifest["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def trainer_states(checkpoint: str) -> dict[str, dict]:
    """{shard: trainer state} of every rank's trainer file."""
    return {p.name[len("trainer-"):-len(".pt")]: torch.load(p, weights_only=True)
            for p in sorted(Path(checkpoint).glob("trainer-*.pt"))}
