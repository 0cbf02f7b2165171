"""mdm_scale.run_queue's runner on plain commands (each item writes a marker file; done = the marker exists): the
training queues, the scaling grid and the language report's evaluations all run through it."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from mdm_scale.run_queue import run_in_order
from parallel.run_lock import RunLock


def _items(root: Path, names: list[str], fail: str | None = None):
    """One item per name: its command appends the name to root/<name>.done (exit 3 instead for `fail`)."""
    items = []
    for name in names:
        (root / name).mkdir(parents=True)
        code = ("import sys; sys.exit(3)" if name == fail else
                f"open({str(root / name / 'done')!r}, 'a').write({name!r} + '\\n')")
        items.append((root / name, [sys.executable, "-c", code], root / f"{name}.log"))
    return items


def _done(run_dir: Path) -> bool:
    return (run_dir / "done").exists()


def test_jobs_side_by_side_run_each_item_once_and_a_failure_does_not_stop_the_others(tmp_path):
    names = [f"r{i}" for i in range(6)]
    lines = []
    failed = run_in_order(_items(tmp_path, names, fail="r2"), jobs=3, done=_done, poll_s=0.05, report=lines.append)
    assert failed == 1 and sorted(lines) == sorted([f"{n}: complete" for n in names if n != "r2"] +
                                                   [f"r2: failed with exit code 3 (see {tmp_path / 'r2.log'})"])
    assert all((tmp_path / n / "done").read_text() == f"{n}\n" for n in names if n != "r2")
    # a second pass finds every finished item done and runs nothing again (only the failed one, which fails again)
    items = [(tmp_path / n, [sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / f"{n}.log") for n in names]
    assert run_in_order(items, jobs=2, done=_done, poll_s=0.05, report=lines.append) == 1
    assert all((tmp_path / n / "done").read_text() == f"{n}\n" for n in names if n != "r2")


def test_readers_ignore_a_training_lock_that_exclusive_queues_wait_for(tmp_path):
    """exclusive=False (evaluation): an item whose run another process holds runs at once; exclusive (training):
    it waits until the lock is released, then runs."""
    (held,) = _items(tmp_path / "read", ["held"])
    with RunLock(held[0]):
        assert run_in_order([held], done=_done, exclusive=False, report=lambda _: None) == 0 and _done(held[0])
    (held,) = _items(tmp_path / "train", ["held"])
    lines = []
    with RunLock(held[0]):
        queue = threading.Thread(target=lambda: run_in_order([held], done=_done, poll_s=0.05, report=lines.append))
        queue.start()
        time.sleep(1.0)
        assert queue.is_alive() and not _done(held[0])  # waiting for the holder
    queue.join(timeout=60)
    assert not queue.is_alive() and _done(held[0]) and lines == ["held: complete"]
