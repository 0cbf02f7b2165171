"""launchers/slurm.py: the sbatch script and layout checks, then real jobs on a real one-node SLURM cluster
(slurm-wlm + munge started by the fixture): a 2-task CPU job trains, and a job sent SIGUSR1 mid-run checkpoints,
requeues itself and ends with exactly the final loss of the uninterrupted job."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdm_scale.metrics import read_metrics
from tests.launchers.slurm_cluster import LocalSlurm

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = [sys.executable, str(ROOT / "launchers" / "slurm.py")]
STEPS = 300  # long enough (several seconds) for the signal to land mid-run even on an idle machine
TINY = [
    "config=tiny", "data.source=committed", "data.tokenizer=byte", "data.seq_len=32", "data.micro_batch_size=4",
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "logging.wandb=false",
    "logging.progress=false", "logging.log_every=1", "train.eval_batches=2", "train.eval_every=0",
    "sampling.num_samples=0", "optimizer.warmup_steps=5", "checkpoint.every=0",
]


def _launch(*args: str, env=None) -> subprocess.CompletedProcess:
    """launchers/slurm.py in a subprocess. The test session's own MASTER_ADDR etc. (set by in-process tests) stay in
    `env`, as a user's shell may hold them: sbatch copies them into the job, which must ignore them."""
    return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


# ------------------------------------------------------------------------------------- script and layout
# Dry runs must work where SLURM is not installed (a laptop, a login node without srun): PATH hides it.
NO_SLURM = {"PATH": str(Path(sys.executable).parent), "HOME": str(Path.home())}


def test_dry_run_prints_the_sbatch_script_for_16_nodes_with_the_resolved_layout():
    out = _launch("--nodes", "16", "--dry-run", "--partition", "gpu", "--time", "1-00:00:00", "config=owt_1b",
                  env=NO_SLURM)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --requeue", "#SBATCH --signal=USR1@120"):
        assert line in script.splitlines(), (line, script)
    assert re.search(r"^srun .* -m submitit\.core\._submit ", script, re.M)
    assert "= 128 ranks = TP 2 x PP 1 x DP 64; ZeRO stage 1; global batch 512 sequences (524,288 tokens)" in script


def test_container_image_runs_every_task_through_pyxis():
    out = _launch("--nodes", "2", "--dry-run", "--container-image", "nvcr.io#nvidia/pytorch:25.10-py3",
                  "config=owt_1b", env=NO_SLURM)
    assert out.returncode == 0, out.stderr
    assert "--container-image=nvcr.io#nvidia/pytorch:25.10-py3" in out.stdout
    assert f"--container-mounts={ROOT}:{ROOT}" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--nodes", "1", "--gpus-per-node", "3"], "world size 3 is not divisible by parallel.tensor_parallel x "
                                               "parallel.pipeline_parallel = 2 x 1 = 2"),
    (["parallel.tensor_parallel=3", "--gpus-per-node", "6"], "model.num_attention_heads 16 is not divisible by "
                                                              "parallel.tensor_parallel 3"),
    (["parallel.pipeline_parallel=5", "--gpus-per-node", "10"], "model.num_layers 24 is not divisible by "
                                                                 "parallel.pipeline_parallel 5"),
    (["model.hiden_size=8"], "hiden_size"),
])
def test_invalid_layout_or_config_is_refused_before_submitting(args, message):
    options = [a for a in args if a.startswith("--") or a.isdigit()]
    overrides = [a for a in args if a not in options]
    out = _launch(*options, "--dry-run", "config=owt_1b", *overrides, env=NO_SLURM)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "#SBATCH" not in out.stdout


def test_array_sweeps_every_combination_as_one_job_array(tmp_path):
    out = _launch("--dry-run", "--gpus-per-node", "1", "--array", "objective=mdlm,lomdm",
                  "--array", "model.num_layers=2,4,6", "config=tiny", f"run_dir={tmp_path}/sweep", env=NO_SLURM)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-5%6" in out.stdout.splitlines()
    dirs = re.findall(r"^# run_dir (\S+):", out.stdout, re.M)
    assert len(dirs) == 6 == len(set(dirs))
    assert f"{tmp_path}/sweep/objective-lomdm_model.num_layers-4" in dirs


def test_slurm_time_formats():
    sys.path.insert(0, str(ROOT / "launchers"))
    from slurm import parse_time

    assert [parse_time(v) for v in ("90", "30:00", "02:00:00", "01:30:30", "1-00", "2-12:30:00")] == \
        [90, 30, 120, 91, 1440, 3630]


# --------------------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _submit(slurm, run_dir: Path, *extra: str) -> str:
    out = _launch("--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "20", *TINY, f"run_dir={run_dir}",
                  f"data.cache_dir={run_dir.parent / 'cache'}", *extra, env=slurm.env)
    assert out.returncode == 0, out.stderr
    match = re.search(r"submitted job (\d+): 1 node\(s\) x 2 tasks \(CPU per node\) = 2 ranks = TP 1 x PP 1 x DP 2",
                      out.stdout)
    assert match, out.stdout
    return match.group(1)


def _job(slurm, job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=slurm.env).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(slurm, job_id: str, until, timeout: float = 600, poll: float = 1.0) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(slurm, job_id)
        if until(job):
            return job
        time.sleep(poll)
    raise AssertionError(f"job {job_id} timed out waiting: {_job(slurm, job_id)}\n{slurm.logs()}")


def _finished(job: dict) -> bool:
    return job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _logs(run_dir: Path, tail: int | None = 4000) -> str:
    """The job's stdout/stderr files (the last `tail` characters of each; None = whole, for searching)."""
    return "\n".join(f"--- {p}\n{p.read_text()[-tail if tail else 0:]}"
                     for p in sorted((run_dir / "slurm").rglob("*_log.*")))


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("jobs") / "uninterrupted"
    job_id = _submit(slurm, run_dir, f"train.steps={STEPS}")
    job = _wait(slurm, job_id, _finished)
    assert job["JobState"] == "COMPLETED", (job, _logs(run_dir))
    return run_dir, job


def test_two_task_cpu_job_trains_through_slurm(uninterrupted):
    run_dir, job = uninterrupted
    steps = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1)), _logs(run_dir)
    assert steps[-1]["train/loss"] < 0.8 * steps[0]["train/loss"]
    assert (run_dir / "config.yaml").exists() and job["NumTasks"] == "2"
    results = sorted((run_dir / "slurm").rglob("*_result.pkl"))
    assert [p.name.split("_")[1] for p in results] == ["0", "1"]  # both tasks returned
    assert "Restarts" in job and job["Restarts"] == "0"


def test_sigusr1_checkpoints_requeues_and_finishes_with_the_uninterrupted_loss(slurm, uninterrupted, tmp_path):
    run_dir = tmp_path / "preempted"
    job_id = _submit(slurm, run_dir, f"train.steps={STEPS}")
    # Signal as soon as training runs (a few hundred ms of steps on an idle machine: poll fast).
    _wait(slurm, job_id, lambda job: _finished(job) or len(read_metrics(run_dir)) >= 3, poll=0.1)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env=slurm.env)
    requeued = _wait(slurm, job_id, lambda job: _finished(job) or (job.get("Restarts") == "1"
                                                                   and job.get("JobState") == "PENDING"))
    assert requeued.get("Restarts") == "1", ("SIGUSR1 did not requeue the job", requeued, _logs(run_dir))
    # SLURM holds a requeued job for ~2 minutes; let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm.env)
    job = _wait(slurm, job_id, _finished)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, _logs(run_dir))
    log = _logs(run_dir, tail=None)
    stopped = re.search(r"stopping at step (\d+) on signal SIGUSR1", log)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert stopped and resumed and stopped.group(1) == resumed.group(2), _logs(run_dir)
    assert 0 < int(resumed.group(2)) < STEPS
    final = {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}
    reference = {m["step"]: m["train/loss"] for m in read_metrics(uninterrupted[0]) if "train/loss" in m}
    assert final[STEPS] == reference[STEPS] and sorted(final) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("config", ["owt_small", "owt_1b", "scale_125m", "scale_350m", "scale_1b", "scale_3b",
                                    "scale_7b"])
def test_every_cluster_config_has_a_valid_layout_on_8_nodes(config):
    out = _launch("--nodes", "8", "--dry-run", f"config={config}")
    assert out.returncode == 0, out.stderr
    assert "= 64 ranks = TP " in out.stdout
