"""One prepared check of the whole training stack on one GPU; `--dry-run` runs the same steps on CPU (CI).

    bash bench/device_check.sh --out $OUT                    # the device machine: installs device_wheels/ first
    python -m bench.device_check --out DIR [--budget 480]    # the same, with the dependencies already importable
    scripts/in_venv.sh python -m bench.device_check --out /tmp/dc --dry-run   # CPU, tiny shapes, ~2 min

Every step runs in its own subprocess with its own timeout, inside one wall budget (`--budget`, default 480 s),
and appends one JSON line to <out>/device_check.json as soon as it ends:
{"step": name, "ok": bool, "seconds": s, "result": {...}} or {..., "error": tail of the output}; a step the
remaining budget cannot fit is recorded with "skipped": true, one stopped at its timeout (or by SIGTERM) with its
error. Everything the subprocesses print goes to <out>/device_check.log. This file is the orchestrator; the plan,
the goals and the steps are bench/device_steps.py. Steps, in order (env and kernels are bench/device_probes.py; the
others run bench scripts and launchers/local.py):

  env            python, torch, CUDA, GPU, Triton, numpy; the carried wheels; every module the steps import
  kernels        fused linear + weighted cross-entropy: Triton (compiled on CUDA, the interpreter in a dry run)
                 against the torch reference, fp32 to 1e-5, bf16 to 2e-2
  bench_kernels  bench/kernels.py at seq 1024, vocab 50257, hidden 768 and 2048: fused/unfused memory and speed;
                 the unfused masking's time per call at batch 8 x 1024 (what training runs to noise a micro-batch)
  step_compare   bench/step.py --config owt_small --dtype bf16: ours vs MDLM's reference step (tokens/s), LoMDM vs
                 MDLM step time, MFU; all three steps interleaved in one process. With bench_kernels' masking time:
                 the masking's share of our MDLM step at the masking's shape (the removed fused masking kernel
                 stays removed while it is < 1%, docs/kernels.md)
  step_memory    the reference step and our MDLM step each alone in a process: their peak memory
  step_mfu       the largest scale_* config that fits one GPU at micro-batch 8 (tried from the largest that the
                 memory estimate allows, falling back on failure): MFU of our MDLM step
  train          200 bf16 steps of owt_small on the embedded `books` corpus (or `committed`) through
                 launchers/local.py, checkpoint at 100, then a second run resumed from that checkpoint: loss
                 falls, every step finite, the resumed step 101 has the uninterrupted run's loss exactly
  zero1          GPU only, if time is left: 10 steps through DeepSpeed ZeRO-1 on the one GPU, finite losses

Goals (docs/performance.md, "GPU device check") are evaluated into the results as {"value", "goal", "met"}; a step's
"ok" says it ran and its correctness checks passed, not that a performance goal was met.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.device_steps import (DRY_PLAN, GPU_PLAN, STEPS, Plan, StepFailed, child_step, step_bench_kernels,
                                step_compare, step_memory, step_mfu, step_train, step_zero1)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "device_check.json"
LOG = "device_check.log"


# ------------------------------------------------------------------------------------------------ the orchestrator


@dataclass
class Finished:
    """One subprocess: return code (None: stopped at its timeout), wall seconds and the end of its output."""

    rc: int | None
    seconds: float
    tail: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class Check:
    """Runs the steps one subprocess at a time inside the budget; appends their JSON lines; logs their output."""

    def __init__(self, out: Path, work: Path, budget: float, env: dict[str, str] | None = None):
        self.out, self.work, self.budget = Path(out), Path(work), budget
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_path, self.log_path = self.out / RESULTS, self.out / LOG
        self.results_path.write_text("")
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [self.env.get("PYTHONPATH")])])
        self.start = time.monotonic()
        self.child: subprocess.Popen | None = None
        self.current: tuple[str, float] | None = None  # (step, its start) while a step runs
        self.results: dict[str, dict] = {}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def say(self, line: str) -> None:
        print(f"[device_check {time.monotonic() - self.start:6.1f}s] {line}", flush=True)

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Finished:
        """Runs argv from the repository root, output appended to the log; killed (its process group) at timeout."""
        start = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%H:%M:%S')} $ {' '.join(argv)}  (timeout {timeout:.0f} s)\n".encode())
            log.flush()
            offset = log.tell()
            self.child = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(env or {})}, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0,
                                          preexec_fn=_die_with_parent)
            try:
                rc = self.child.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                self.kill_child()
                rc = None
            finally:
                self.child = None
        seconds = time.monotonic() - start
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            tail = log.read().decode(errors="replace")[-4000:]
        with open(self.log_path, "a") as log:
            log.write(f"===== rc {rc} after {seconds:.1f} s\n")
        return Finished(rc, seconds, tail)

    def kill_child(self) -> None:
        """SIGKILL to the running step's process group (the step and its workers)."""
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait(timeout=30)  # with a timeout: safe inside a signal handler that interrupted wait()
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    def record(self, name: str, ok: bool, seconds: float, **fields) -> dict:
        """Appends one JSON line (one write, flushed and synced: a kill never leaves half a line)."""
        line = {"step": name, "ok": ok, "seconds": round(seconds, 2), **fields}
        self.results[name] = line
        fd = os.open(self.results_path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (json.dumps(line, default=str) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return line

    def step(self, name: str, fn: Callable[[float], dict], timeout: float, least: float, keep: float = 0.0) -> dict:
        """Runs fn(limit seconds) unless the budget left (less `keep` seconds for later steps) is under `least`;
        records its line."""
        left = self.remaining() - keep
        if left < least:
            self.say(f"{name}: skipped ({left:.0f} s of the budget left, needs {least:.0f})")
            return self.record(name, False, 0.0, skipped=True,
                               error=f"skipped: {left:.0f} s of the budget left, the step needs {least:.0f}")
        limit = min(timeout, left)
        self.say(f"{name}: started (limit {limit:.0f} s)")
        start = time.monotonic()
        self.current = (name, start)
        try:
            result = fn(limit)
            line = self.record(name, True, time.monotonic() - start, result=result)
        except StepFailed as e:
            fields = {"error": _clip(str(e))}
            if e.result is not None:
                fields["result"] = e.result
            line = self.record(name, False, time.monotonic() - start, **fields)
        except Exception as e:  # a bug in the check itself: recorded like a failed step, the next steps still run
            line = self.record(name, False, time.monotonic() - start, error=f"{type(e).__name__}: {e}")
        finally:
            self.current = None
        self.say(f"{name}: {'ok' if line['ok'] else 'FAILED'} in {line['seconds']:.1f} s")
        return line

    def interrupt(self, signum: int) -> None:
        """SIGTERM/SIGINT: stop the running subprocess and record the running step before exiting."""
        self.kill_child()
        if self.current is not None:
            name, start = self.current
            self.record(name, False, time.monotonic() - start,
                        error=f"interrupted by {signal.Signals(signum).name} (the caller's time limit?)")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the orchestrator dies (even by SIGKILL). Children get their own
    process group, so that a timeout kills a step with its workers and not the orchestrator."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _clip(text: str, size: int = 6000) -> str:
    """The first line (what failed) and the end (the exception) of a long error."""
    if len(text) <= size:
        return text
    first = text.split("\n", 1)[0][:300]
    return f"{first}\n[...]\n{text[-(size - len(first)):]}"


# ----------------------------------------------------------------------------------------------------- run them


def run_all(check: Check, plan: Plan, only: set[str], corpus: str = "auto") -> None:
    steps = {
        "env": lambda limit: child_step(check, plan, "env", limit),
        "kernels": lambda limit: child_step(check, plan, "kernels", limit),
        "bench_kernels": lambda limit: step_bench_kernels(check, plan, limit),
        "step_compare": lambda limit: step_compare(check, plan, limit),
        "step_memory": lambda limit: step_memory(check, plan, limit),
        "step_mfu": lambda limit: step_mfu(check, plan, limit),
        "train": lambda limit: step_train(check, plan, corpus, limit),
        "zero1": lambda limit: step_zero1(check, plan, corpus, limit),
    }
    before_train = plan.steps[:plan.steps.index("train")] if "train" in only else ()
    for name in plan.steps:
        if name in only:
            check.step(name, steps[name], *plan.timeouts[name], keep=plan.keep_for_train if name in before_train else 0)


def goals_in(result, prefix: str = "") -> dict[str, dict]:
    """Every goal dict ({"value", "goal", "met"}) inside a result, by its dotted path."""
    if not isinstance(result, dict):
        return {}
    if "goal" in result and "met" in result:
        return {prefix: result}
    found = {}
    for key, value in result.items():
        if key != "report":
            found.update(goals_in(value, f"{prefix}.{key}" if prefix else key))
    return found


def summary(check: Check) -> str:
    """The table printed last (the device tool returns the end of the output)."""
    lines = [f"{'step':<14} {'status':<8} {'seconds':>7}  details"]
    for name, line in check.results.items():
        status = "skipped" if line.get("skipped") else ("ok" if line["ok"] else "FAILED")
        result = line.get("result") or {}
        parts = [f"{path.removeprefix('goals.')} {g['value']:.3g} ({g['goal']}: {'met' if g['met'] else 'NOT met'})"
                 for path, g in goals_in(result).items() if g["value"] is not None]
        if name == "env" and result:
            parts.append(f"{result.get('gpu', {}).get('name', 'no GPU')}, torch {result.get('torch')}, "
                         f"triton {result.get('triton')}")
        if name == "kernels" and "cases" in result:
            parts.append(f"{sum(c['ok'] for c in result['cases'].values())}/{len(result['cases'])} cases agree "
                         f"({'interpreted' if result.get('interpreted') else 'compiled'} Triton)")
        if name == "step_mfu" and "config" in result:
            parts.append(f"largest fitting: {result['config']}")
        if name == "train" and "mean_last" in result:
            parts.append(f"loss {result['mean_first']:.3f} -> {result['mean_last']:.3f}, "
                         f"resumed identical: {result.get('resume_identical')}")
        if not line["ok"] and line.get("error"):
            parts.append(line["error"].strip().splitlines()[0][:160])
        lines.append(f"{name:<14} {status:<8} {line['seconds']:7.1f}  " + "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for device_check.json and device_check.log")
    p.add_argument("--dry-run", action="store_true", help="the same steps on CPU with tiny shapes (CI)")
    p.add_argument("--budget", type=float, default=None, help="total wall seconds (default 480; dry run 900)")
    p.add_argument("--work", default=None, help="scratch folder for run directories and checkpoints (default: a "
                                                "new temporary folder, removed at the end)")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--train-corpus", choices=("auto", "books", "committed"), default="auto",
                   help="data of the train and zero1 steps (auto: books on a GPU when carried, else committed)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out is required")
    unknown = set(args.only.split(",")) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mdm_device_check_"))
    env = {"TRITON_INTERPRET": "1" if args.dry_run else "0", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    check = Check(Path(args.out), work, args.budget or plan.budget, env)

    def on_signal(signum, _frame):
        check.interrupt(signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    check.say(f"{'dry run (CPU)' if args.dry_run else 'GPU'}: budget {check.budget:.0f} s, results "
              f"{check.results_path}, log {check.log_path}, work {work}")
    try:
        run_all(check, plan, set(args.only.split(",")), args.train_corpus)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    table = summary(check)
    with open(check.log_path, "a") as log:
        log.write("\n" + table + "\n")
    print(table, flush=True)
    return 0 if all(line["ok"] for line in check.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
