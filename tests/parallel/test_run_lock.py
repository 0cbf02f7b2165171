"""The run-directory lock: exclusive while its owner lives, taken over when the owner is provably gone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parallel.run_lock import LOCK_FILE, RunLock, RunLockError


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_holder_is_refused_and_release_frees_it(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()
        with pytest.raises(RunLockError, match="in use by another run"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_lock_of_a_live_process_in_another_process_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": holder.pid}))
        with pytest.raises(RunLockError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": _dead_pid()}))
    with pytest.warns(UserWarning, match="stale lock"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == __import__("os").getpid()
    lock.release()


def test_lock_of_the_same_slurm_job_is_taken_over_on_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 1, "slurm_job_id": "4242"}))
    with pytest.warns(UserWarning, match="requeued"):
        RunLock(tmp_path).acquire().release()


def test_lock_from_another_host_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 1, "slurm_job_id": "4242"}))
    with pytest.raises(RunLockError, match="node-17.*delete"):
        RunLock(tmp_path).acquire()


def test_lock_holder_reports_a_live_owner_only(tmp_path):
    from parallel.run_lock import lock_holder

    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path):
        assert lock_holder(tmp_path)["pid"] == __import__("os").getpid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": _dead_pid()}))
    assert lock_holder(tmp_path) is None  # stale
