"""launchers/local.py as a user meets it: expected errors are one line on stderr with exit code 2, and the
screen carries the run's output, not library warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = ["data.source=committed", "data.tokenizer=byte", "data.seq_len=16", "data.micro_batch_size=4",
        "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "logging.wandb=false",
        "logging.progress=false", "train.eval_batches=1", "sampling.num_samples=0"]


def _local(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/local.py"), "config=tiny", *FAST, *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_tensor_parallel_larger_than_the_world_is_one_line(tmp_path):
    proc = _local("parallel.tensor_parallel=2", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    _one_line_error(proc, "config error: invalid parallel layout: world size 1 is not divisible")


def test_missing_data_path_is_named_as_missing(tmp_path):
    proc = _local(f"data.path={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    _one_line_error(proc, f"error: {tmp_path / 'nowhere' / 'train'}: no such shard directory")


def test_a_run_prints_no_library_warnings_and_states_the_fallback_once(tmp_path):
    proc = _local("train.steps=1", f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "Transformer Engine" not in proc.stderr, proc.stderr
    assert proc.stdout.count("not installed; using its torch fallbacks") == 1, proc.stdout
