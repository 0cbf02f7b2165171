"""Fused vs unfused MDM loss head side by side in one run, and the masking's time (issue 4, docs/kernels.md).

    scripts/in_venv.sh python bench/kernels.py                       # GPU: vocab 50257, seq 1024, h 768 and 2048
    scripts/in_venv.sh python bench/kernels.py --device cpu --quick  # CPU: seq 128, batch 2 (< 2 min on 2 cores)
    python bench/kernels.py --json kernels.json                      # also every number as JSON (bench/device_check.py)

For each hidden size it runs the loss over the n = batch * seq * mask_frac masked rows (hidden [n, h], output
matrix [V_padded, h], per-row weights), forward + backward into hidden, weight and row weights:

* unfused: full [n, V] logits, PAD columns, F.cross_entropy, weighted sum (what autograd keeps: logits + log-softmax)
* fused-torch / fused-triton: mdm_scale.kernels.weighted_linear_cross_entropy (Triton only on GPU)
* liger: LigerFusedLinearCrossEntropyLoss (unweighted mean CE: Liger has no per-row weights) when installed

Memory is the peak of bytes allocated during fwd + bwd above what was live before it (inputs not counted, the
gradients it produces counted): torch.cuda.max_memory_allocated on GPU; on CPU the torch profiler's allocation
events (profile_memory=True: every CPU tensor allocation and free, summed in time order), i.e. live tensor bytes,
not RSS. Time is the median wall time of fwd + bwd (CUDA-synchronised on GPU).

Masking: the time per call of what training runs to noise one micro-batch (batch x seq): draw_noise's float64
uniforms (CPU generator, copied to the device), polynomial_masking with per-position exponents, then apply_noise's
mask decisions and z_t and nelbo_from_features' float32 loss weights. It bounds what any fused masking kernel could
save; bench/device_check.py sets it against the step time (docs/kernels.md, "Masking: not fused").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from mdm_scale.kernels import triton_available
from mdm_scale.kernels.linear_cross_entropy import auto_chunk_rows, weighted_linear_cross_entropy

with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine / Apex on import
    warnings.simplefilter("ignore")
    from mdm_scale.denoiser import PAD_LOGIT, padded_size


def unfused_loss(hidden, weight, targets, row_weight, vocab_size):
    logits = hidden @ weight.t()
    logits = logits.masked_fill(torch.arange(weight.shape[0], device=weight.device) >= vocab_size, PAD_LOGIT)
    return (row_weight * F.cross_entropy(logits.float(), targets, reduction="none")).sum()


def make_variants(vocab_size: int, device: torch.device, chunk_rows: int | None) -> dict:
    variants = {"unfused": lambda h, w, y, r: unfused_loss(h, w, y, r, vocab_size)}
    variants["fused-torch"] = lambda h, w, y, r: weighted_linear_cross_entropy(
        h, w, y, r, vocab_size=vocab_size, chunk_rows=chunk_rows, backend="torch")[0]
    if device.type == "cuda" and triton_available():
        variants["fused-triton"] = lambda h, w, y, r: weighted_linear_cross_entropy(
            h, w, y, r, vocab_size=vocab_size, chunk_rows=chunk_rows, backend="triton")[0]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        variants["liger"] = lambda h, w, y, r: liger(w, h, y)  # unweighted mean; padded columns not excluded
    except ImportError:
        pass
    return variants


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, above the bytes live when it starts."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def median_seconds(fn, device: torch.device, reps: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # Triton compilation, allocator
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def auto_batch(args, hidden_size: int, device: torch.device, elem: int) -> int:
    """Largest power-of-two batch whose unfused loss fits in ~70% of free GPU memory (logits, log-softmax, grad)."""
    if device.type != "cuda":
        return 2
    free, _ = torch.cuda.mem_get_info(device)
    vocab = padded_size(args.vocab + 1, 1)
    per_row = vocab * (2 * elem + 4 + 4 + 4) + 4 * hidden_size * elem  # logits, masked copy, fp32, log-softmax, grad
    fixed = 3 * vocab * hidden_size * 4
    rows = max(1, int((0.7 * free - fixed) / per_row))
    batch = max(1, int(rows / (args.seq * args.mask_frac)))
    return 1 << (batch.bit_length() - 1)


def bench_loss(args, hidden_size: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict | None:
    """Prints one table and returns its numbers; None when the unfused loss ran out of memory (the caller retries a
    smaller batch)."""
    vocab_padded = padded_size(args.vocab + 1, 1)  # real tokens + mask id, GEMM padding (as the Denoiser)
    n = max(1, int(batch * args.seq * args.mask_frac))
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, hidden_size, generator=g)).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab_padded, hidden_size, generator=g) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (n,), generator=g).to(device)
    row_weight = (torch.rand(n, generator=g) * 2).to(device).requires_grad_()
    print(f"\n== hidden {hidden_size}: batch {batch} x seq {args.seq} x mask_frac {args.mask_frac} = {n} masked rows, "
          f"vocab {args.vocab} (padded {vocab_padded}), {str(dtype).removeprefix('torch.')} on {device}; "
          f"full logits would be {n * vocab_padded * 4 / 2**20:.0f} MiB fp32")
    results = {}
    for name, loss_fn in make_variants(args.vocab, device, args.chunk_rows).items():
        def step():
            hidden.grad = weight.grad = row_weight.grad = None
            loss_fn(hidden, weight, targets, row_weight).backward()

        try:
            mem = peak_bytes(step, device)  # also the warm-up run (Triton compilation, allocator)
            seconds = median_seconds(step, device, args.reps, warmup=False)
        except torch.OutOfMemoryError:
            print(f"{name:>13}: out of memory")
            if name == "unfused":
                return None
            continue
        finally:
            hidden.grad = weight.grad = row_weight.grad = None
        results[name] = (mem, seconds)
    base_mem, base_time = results.get("unfused", (float("nan"), float("nan")))
    dw = weight.numel() * weight.element_size()  # the weight gradient: every variant produces it
    print(f"chunk rows (fused): {args.chunk_rows or auto_chunk_rows(n, hidden_size, vocab_padded)}; "
          f"weight gradient alone: {dw / 2**20:.0f} MiB ('excl. dW' columns subtract it)")
    print(f"{'variant':>13} {'peak MiB':>10} {'mem/unfused':>12} {'excl. dW MiB':>13} {'excl. dW ratio':>15} "
          f"{'fwd+bwd ms':>11} {'speedup':>8}")
    for name, (mem, seconds) in results.items():
        print(f"{name:>13} {mem / 2**20:10.1f} {mem / base_mem:12.3f} {(mem - dw) / 2**20:13.1f} "
              f"{(mem - dw) / (base_mem - dw):15.3f} {seconds * 1e3:11.1f} {base_time / seconds:8.2f}")
    return {"batch": batch, "rows": n, "vocab_padded": vocab_padded, "weight_grad_bytes": dw,
            "variants": {name: {"peak_bytes": mem, "seconds": seconds, "mem_over_unfused": mem / base_mem,
                                "speedup": base_time / seconds} for name, (mem, seconds) in results.items()}}


def bench_masking(args, device: torch.device) -> dict:
    """The unfused masking path training runs (module docstring), timed per call: {"batch", "seq", "path",
    "seconds_per_call"}."""
    from mdm_scale.schedules.base import polynomial_masking

    batch = 8 if args.batch == "auto" else int(args.batch)
    b, l = batch, args.seq
    x0 = torch.randint(0, args.vocab, (b, l), device=device)
    t = torch.rand(b, dtype=torch.float64, device=device)
    t_weight = torch.ones(b, dtype=torch.float64, device=device)
    w = torch.rand(b, l, dtype=torch.float64, device=device) + 0.5  # per-position exponents (MDM-LS, LoMDM)
    generator = torch.Generator().manual_seed(0)

    def unfused():
        u = torch.rand(b, l, generator=generator, dtype=torch.float64).to(device)  # as draw_noise
        m = polynomial_masking(t, w)
        masked = u < m.mask_prob  # apply_noise
        z = torch.where(masked, torch.full_like(x0, args.vocab), x0)
        return z, masked, (m.weight * t_weight[:, None]).float() * masked  # nelbo_from_features' weight

    def many(calls=50):  # calls are ~0.1 ms: time 50 back to back
        for _ in range(calls):
            unfused()

    seconds = median_seconds(many, device, max(args.reps, 3)) / 50
    print(f"\n== masking: batch {b} x seq {l}, per-position exponents, on {device}: unfused (what training runs) "
          f"{seconds * 1e3:.3f} ms per call")
    return {"batch": b, "seq": l, "path": "draw_noise uniforms + polynomial_masking + apply_noise + loss weights",
            "seconds_per_call": seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--hidden", type=int, nargs="+", default=[768, 2048])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", default="auto", help="'auto' (largest that fits the unfused loss on GPU; 2 on CPU)")
    p.add_argument("--mask-frac", type=float, default=0.5,
                   help="fraction of positions masked (rows of the loss); 0.5 = mean under MDLM's uniform t")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16")
    p.add_argument("--chunk-rows", type=int, default=None, help="fused chunk rows (default: auto)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized run: seq 128, batch 4 (256 masked rows), chunk rows 64, 1 timed rep")
    p.add_argument("--json", metavar="PATH", help="also write every number to PATH as JSON")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.quick:
        args.seq, args.reps = 128, 1
        args.batch = "4" if args.batch == "auto" else args.batch
        args.chunk_rows = args.chunk_rows or 64
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                f" ({torch.get_num_threads()} threads)")
          + f"; shape: vocab {args.vocab}, seq {args.seq}, batch {args.batch}, mask_frac {args.mask_frac}, "
          f"hidden {args.hidden}, chunk rows {args.chunk_rows or 'auto'}, reps {args.reps}"
          + (" [--quick]" if args.quick else ""))
    if device.type == "cuda":
        print("memory: torch.cuda.max_memory_allocated above the live bytes before the step")
    else:
        print("memory: torch profiler CPU allocation events: peak live tensor bytes above those before the step")
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "dtype": str(dtype).removeprefix("torch."), "vocab": args.vocab, "seq": args.seq,
              "mask_frac": args.mask_frac, "reps": args.reps, "loss": {}}
    for hidden_size in args.hidden:
        if args.batch == "auto":
            batch = auto_batch(args, hidden_size, device, torch.finfo(dtype).bits // 8)
        else:
            batch = int(args.batch)
        while (result := bench_loss(args, hidden_size, batch, device, dtype)) is None and args.batch == "auto" \
                and batch > 1:
            batch //= 2  # the estimate was optimistic: retry with half the batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["loss"][str(hidden_size)] = result
    report["masking"] = bench_masking(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
