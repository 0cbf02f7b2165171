"""Runs one after another on one machine, resumable: rerunning the queue skips finished runs and resumes the rest.

Used by the language benchmark (experiments/char_lm.py queue) and the scaling planner (`python -m mdm_scale.scaling
plan --local`). Each run is a launcher command with its own run directory; its output is appended to its log.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterable
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


def run_in_order(runs: Iterable[tuple[Path, list[str], Path]], *, threads: int = 1, poll_s: float = 60.0,
                 report=print) -> int:
    """Run each (run_dir, command, log) to completion in turn (OMP_NUM_THREADS=threads), skipping finished runs.
    A run another process holds (its run lock) is passed over and come back to once the others are done, so any
    number of queues (threads sharing one iterator of `runs`, or other processes on the same files) drain one list
    and each run trains once. A failed run is reported and left; the queue goes on to the next (its compute is
    not wasted). Returns the number of failed runs."""
    from parallel.run_lock import lock_holder

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def attempt(run_dir: Path, command: list[str], log_path: Path) -> str:
        """'done', 'failed' or 'held' (by another process)."""
        while not is_complete(run_dir):
            if lock_holder(run_dir) is not None:
                return "held"
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            if proc.returncode != 0 and lock_holder(run_dir) is None:  # not merely taken by another queue
                report(f"{run_dir.name}: failed with exit code {proc.returncode} (see {log_path})")
                return "failed"
        report(f"{run_dir.name}: complete")
        return "done"

    failed, held = 0, []
    for run_dir, command, log_path in runs:
        outcome = attempt(Path(run_dir), command, log_path)
        failed += outcome == "failed"
        if outcome == "held":
            held.append((Path(run_dir), command, log_path))
    while held:  # what other processes train: wait for each to end, take it over if it stops unfinished
        time.sleep(poll_s)
        outcomes = [attempt(*item) for item in held]
        failed += outcomes.count("failed")
        held = [item for item, outcome in zip(held, outcomes) if outcome == "held"]
    return failed


class SharedQueue:
    """One iterator for several threads: each item goes to exactly one of them (mdm_scale.scaling's --workers)."""

    def __init__(self, items):
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            return next(self._items)
