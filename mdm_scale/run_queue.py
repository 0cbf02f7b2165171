"""Runs one after another on one machine, resumable: rerunning the queue skips finished runs and resumes the rest.

Used by the language benchmark (experiments/char_lm.py queue) and the scaling planner (`python -m mdm_scale.scaling
plan --local`). Each run is a launcher command with its own run directory; its output is appended to its log.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def is_complete(run_dir: Path) -> bool:
    """The run's newest valid checkpoint has reached its configured train.steps."""
    from mdm_scale.config import load_config
    from parallel.checkpoint import checkpoint_step, list_checkpoints

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        return False
    done = list_checkpoints(run_dir / "checkpoints")
    return bool(done) and checkpoint_step(done[-1]) >= load_config(run_dir / "config.yaml").train.steps


def run_in_order(runs: list[tuple[Path, list[str], Path]], *, threads: int = 1, poll_s: float = 60.0,
                 report=print) -> int:
    """Run each (run_dir, command, log) to completion in turn (OMP_NUM_THREADS=threads), skipping finished runs and
    waiting while another process holds a run's lock. A failed run is reported and left; the queue goes on to the
    next (its compute is not wasted). Returns the number of failed runs."""
    from parallel.run_lock import lock_holder

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    failed = 0
    for run_dir, command, log_path in runs:
        run_dir = Path(run_dir)
        while not is_complete(run_dir):
            if lock_holder(run_dir) is not None:  # another process trains it: wait for it to end
                time.sleep(poll_s)
                continue
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            if proc.returncode == 0 or lock_holder(run_dir) is not None:  # done, or taken meanwhile
                continue
            report(f"{run_dir.name}: failed with exit code {proc.returncode} (see {log_path})")
            failed += 1
            break
        else:
            report(f"{run_dir.name}: complete")
    return failed
