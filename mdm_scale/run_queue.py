"""Runs one after another on one machine, resumable: rerunning the queue skips finished runs and resumes the rest.

Used by the language benchmark (experiments/char_lm.py: `queue` trains, `report` evaluates each run in its own
process) and the scaling planner (`python -m mdm_scale.scaling plan --local`). Each item is a command with its run
directory and a log its output is appended to.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def training_progress(run_dir: Path, steps: int | None = None) -> tuple[int, int]:
    """(the step of the run's newest valid checkpoint, 0 without one; its configured train.steps, read from its
    config.yaml unless the caller passes `steps`). A run directory without its config.yaml has not started: (0, 1)."""
    from mdm_scale.config import load_config
    from parallel.checkpoint import checkpoint_step, list_checkpoints

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        return 0, 1
    done = list_checkpoints(run_dir / "checkpoints")
    if steps is None:
        steps = load_config(run_dir / "config.yaml").train.steps
    return (checkpoint_step(done[-1]) if done else 0), steps


def is_complete(run_dir: Path) -> bool:
    """The run's newest valid checkpoint has reached its configured train.steps."""
    step, steps = training_progress(run_dir)
    return step >= steps


def run_in_order(runs: Iterable[tuple[Path, list[str], Path]], *, threads: int = 1, jobs: int = 1,
                 done: Callable[[Path], bool] = is_complete, exclusive: bool = True, poll_s: float = 60.0,
                 report=print) -> int:
    """Run each (run_dir, command, log) until done(run_dir) (OMP_NUM_THREADS=threads), skipping those already done;
    `jobs` commands side by side (threads sharing one iterator of `runs`). A command that ends without its run
    done is run again (a training resumes). exclusive (training): a run another process holds (its run lock) is
    passed over and come back to once the others are done, so any number of queues, here or in other processes,
    drain one list and each run trains once; not exclusive (commands that only read the run, like evaluation):
    locks are not consulted. A failed command is reported and left; the queue goes on to the next (its compute is
    not wasted). Returns the number of failed runs."""
    from parallel.run_lock import lock_holder

    if jobs > 1:
        shared = SharedQueue(runs)
        with ThreadPoolExecutor(jobs) as pool:
            return sum(pool.map(lambda _: run_in_order(shared, threads=threads, done=done, exclusive=exclusive,
                                                       poll_s=poll_s, report=report), range(jobs)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def held(run_dir: Path) -> bool:
        return exclusive and lock_holder(run_dir) is not None

    def attempt(run_dir: Path, command: list[str], log_path: Path) -> str:
        """'done', 'failed' or 'held' (by another process)."""
        while not done(run_dir):
            if held(run_dir):
                return "held"
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            if proc.returncode != 0 and not held(run_dir):  # not merely taken by another queue
                report(f"{run_dir.name}: failed with exit code {proc.returncode} (see {log_path})")
                return "failed"
        report(f"{run_dir.name}: complete")
        return "done"

    failed, waiting = 0, []
    for run_dir, command, log_path in runs:
        outcome = attempt(Path(run_dir), command, log_path)
        failed += outcome == "failed"
        if outcome == "held":
            waiting.append((Path(run_dir), command, log_path))
    while waiting:  # what other processes train: wait for each to end, take it over if it stops unfinished
        time.sleep(poll_s)
        outcomes = [attempt(*item) for item in waiting]
        failed += outcomes.count("failed")
        waiting = [item for item, outcome in zip(waiting, outcomes) if outcome == "held"]
    return failed


class SharedQueue:
    """One iterator for several threads: each item goes to exactly one of them (run_in_order's jobs)."""

    def __init__(self, items):
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            return next(self._items)
