"""How step time, memory and communication grow with TP / PP / DP (results and reading: bench/scaling.md).

    scripts/in_venv.sh python bench/scaling.py                 # measured on this machine + owt_1b predictions
    scripts/in_venv.sh python bench/scaling.py --predict-only  # only the analytic owt_1b table

1. Measured: the same model and global batch trained for a few steps under each layout with real processes
   (torchrun + launchers/local.py, gloo on CPU): median step time after warm-up (from metrics.jsonl) and the
   peak resident memory of the largest rank (getrusage of the reaped children).
2. Predicted: bytes each rank sends per optimizer step for owt_1b (or --config) at 16 nodes x 8 GPUs, per layout:

   DP   gradients, ring all-reduce (ZeRO-1: reduce-scatter + all-gather, the same volume):
            2 (DP-1)/DP * 4 bytes * params / (TP * PP)
   TP   2 all-reduces of [s, b, h] activations per layer forward and 2 in backward (megatron's f/g operators),
        each 2 (TP-1)/TP * s b h * 2 bytes (bf16), per micro-batch; LoMDM's clean forward adds the 2 forward ones
   PP   one [s, b, h] bf16 activation sent forward and one gradient back per stage boundary per micro-batch

   Time at NVLink (TP, inside a node) and InfiniBand (DP, PP across nodes) bandwidths, against the compute time
   6 N tokens / (peak x MFU). Overlap is ignored: these are upper bounds on the exposed communication.
   The formulas live in parallel/comm.py (shared with `launchers/slurm.py --plan`); PP sends fp32 (the
   denoiser's pipeline_dtype).
3. Memory check: parallel/plan.py's prediction for each measured layout (largest rank) next to its measured peak.
   CPU peak RSS includes the Python / torch / megatron / DeepSpeed runtime, which the plan does not model, so it is
   measured: an import-only process (what `import mdm_scale.train, deepspeed` costs), and the runtime floor = the
   same launcher run with a ~zero-size model (hidden 8), 1 rank and 2 ranks, minus the plan's prediction for that
   model. Prediction = floor + plan; the import-only baseline is printed to show how much of the floor is imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEASURED_MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4",
                  "model.tie_embeddings=false", "data.seq_len=128", "data.tokenizer=byte", "data.source=committed"]
COMMON = ["logging.wandb=false", "logging.progress=false", "logging.log_every=1", "train.eval_every=0",
          "train.eval_batches=1", "sampling.num_samples=0", "checkpoint.every=0", "optimizer.warmup_steps=1"]
FLOOR_MODEL = ["model.hidden_size=8", "model.num_attention_heads=2"]  # the runtime floor: a ~zero-size model
LAYOUTS = {  # name: (processes, overrides); the global batch is 16 sequences in every layout
    "1 rank": (1, ["data.micro_batch_size=16"]),
    "DP 2": (2, ["data.micro_batch_size=8"]),
    "TP 2": (2, ["data.micro_batch_size=16", "parallel.tensor_parallel=2"]),
    "PP 2": (2, ["data.micro_batch_size=8", "data.grad_accumulation=2", "parallel.pipeline_parallel=2"]),
    "DP 2 + ZeRO-1": (2, ["data.micro_batch_size=8", "parallel.zero_stage=1"]),
}


def measure(name: str, procs: int, overrides: list[str], steps: int, work: Path) -> dict:
    run_dir = work / name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           str(ROOT / "launchers" / "local.py"), "config=tiny", *MEASURED_MODEL, *COMMON, *overrides,
           f"train.steps={steps}", f"run_dir={run_dir}", f"data.cache_dir={work / 'cache'}"]
    # One thread per rank: a layout with N ranks uses N cores, so "vs 1 rank" is the parallel speed-up per core.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    # A wrapper process reaps torchrun, which reaps the ranks: its RUSAGE_CHILDREN maxrss is this run's largest rank.
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m][2:]  # after warm-up
    tokens = 16 * 128
    step_s = statistics.median(tokens / r for r in rates)
    return {"layout": name, "ranks": procs, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "peak_rss_mib": peak_kib / 1024}


def predict(cfg, nodes: int, gpus: int, layouts: list[tuple[int, int]], *, nvlink_gbs: float, ib_gbs: float,
            peak_tflops: float, mfu: float) -> list[dict]:
    from parallel.comm import step_bytes

    m, s = cfg.model, cfg.data.seq_len
    h, layers = m.hidden_size, m.num_layers
    params = 12 * layers * h * h + 2 * 50304 * h  # blocks + untied embedding and head
    world = nodes * gpus
    configured_dp = world // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    global_sequences = cfg.data.micro_batch_size * cfg.data.grad_accumulation * configured_dp
    rows = []
    for tp, pp in layouts:
        dp = world // (tp * pp)
        micro = max(1, global_sequences // dp // cfg.data.micro_batch_size)  # micro-batches per rank per step
        sent = step_bytes(params=params // (tp * pp), tp=tp, pp=pp, dp=dp, layers=layers, seq_len=s,
                          micro_batch=cfg.data.micro_batch_size, hidden=h, micro_batches=micro)
        compute_s = 6 * params * global_sequences * s / world / (peak_tflops * 1e12 * mfu)  # FLOPs split evenly
        comm_s = (sent.dp / (ib_gbs * 1e9 / gpus) + sent.tp / (nvlink_gbs * 1e9)
                  + sent.pp / (ib_gbs * 1e9 / gpus))
        rows.append({"layout": f"TP {tp} x PP {pp} x DP {dp}", "dp_gb": sent.dp / 1e9, "tp_gb": sent.tp / 1e9,
                     "pp_gb": sent.pp / 1e9, "compute_s": compute_s, "comm_s": comm_s,
                     "comm_over_compute": comm_s / compute_s})
    return rows


def import_baseline_mib() -> float:
    """Peak RSS of a process that only imports what a rank imports (the training code and DeepSpeed)."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-c", "import mdm_scale.train, deepspeed"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def planned_mib(procs: int, overrides: list[str]) -> float:
    """parallel/plan.py's bytes for the largest rank of a measured layout (CPU, fp32), in MiB."""
    from data_pipeline.tokenizer import load_tokenizer
    from mdm_scale.config import load_config
    from parallel.plan import Layout, plan

    cfg = load_config("tiny", [*MEASURED_MODEL, *COMMON, *overrides])
    p = cfg.parallel
    layout = Layout(1, procs, p.tensor_parallel, p.pipeline_parallel, p.zero_stage, gpu=False)
    return max(r.total for r in plan(cfg, layout, load_tokenizer(cfg.data.tokenizer).vocab_size)) / 2 ** 20


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--predict-only", action="store_true")
    p.add_argument("--layouts", nargs="*", default=None, help=f"measure only these ({', '.join(LAYOUTS)})")
    p.add_argument("--config", default="owt_1b")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="per-GPU NVLink bandwidth, GB/s (H100: 450)")
    p.add_argument("--ib-gbs", type=float, default=400.0, help="per-node InfiniBand bandwidth, GB/s (8 x 400 Gb/s)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4)
    args = p.parse_args(argv)

    if not args.predict_only:
        print(f"Measured on this machine ({os.cpu_count()} cores): tiny-like model (4 blocks, hidden 256, seq 128), "
              f"global batch 16, {args.steps} steps per layout")
        print("| layout | ranks | step s | tokens/s | vs 1 rank | peak RSS (largest rank) MiB |")
        print("|---|---|---|---|---|---|")
        layouts = {n: v for n, v in LAYOUTS.items() if not args.layouts or n in args.layouts}
        with tempfile.TemporaryDirectory() as tmp:
            results = [measure(n, procs, o, args.steps, Path(tmp)) for n, (procs, o) in layouts.items()]
            floors = {procs: measure(f"floor {procs}", procs, [*LAYOUTS[name][1], *FLOOR_MODEL], args.steps,
                                     Path(tmp))["peak_rss_mib"] - planned_mib(procs, [*LAYOUTS[name][1], *FLOOR_MODEL])
                      for procs, name in ((1, "1 rank"), (2, "DP 2")) if any(r["ranks"] == procs for r in results)}
        base = results[0]["step_s"]
        for r in results:
            print(f"| {r['layout']} | {r['ranks']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                  f"{base / r['step_s']:.2f}x | {r['peak_rss_mib']:,.0f} |")
        print()
        imports = import_baseline_mib()
        print(f"Memory: parallel/plan.py's prediction for the largest rank vs the measured peak RSS. Runtime floor "
              f"(measured, hidden-8 model, minus its plan): {', '.join(f'{k} rank(s) {v:,.0f} MiB' for k, v in floors.items())}"
              f"; of that, imports alone: {imports:,.0f} MiB")
        print("| layout | plan MiB (model) | floor MiB | predicted MiB | measured MiB | error |")
        print("|---|---|---|---|---|---|")
        for r in results:
            model = planned_mib(r["ranks"], layouts[r["layout"]][1])
            predicted = model + floors[r["ranks"]]
            print(f"| {r['layout']} | {model:,.0f} | {floors[r['ranks']]:,.0f} | {predicted:,.0f} | "
                  f"{r['peak_rss_mib']:,.0f} | {(predicted - r['peak_rss_mib']) / r['peak_rss_mib']:+.1%} |")
        print()

    from mdm_scale.config import load_config

    cfg = load_config(args.config)
    world = args.nodes * args.gpus_per_node
    layouts = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (2, 4)]
    print(f"Predicted per optimizer step for {args.config} on {args.nodes} nodes x {args.gpus_per_node} GPUs "
          f"({world} ranks), global batch as configured for TP {cfg.parallel.tensor_parallel}; NVLink "
          f"{args.nvlink_gbs:.0f} GB/s/GPU, IB {args.ib_gbs:.0f} GB/s/node, {args.peak_tflops:.0f} TFLOP/s x MFU "
          f"{args.mfu}")
    print("| layout | DP grads GB/rank | TP activations GB/rank | PP GB/rank | compute s | comm s (no overlap) "
          "| comm / compute |")
    print("|---|---|---|---|---|---|---|")
    for r in predict(cfg, args.nodes, args.gpus_per_node, layouts, nvlink_gbs=args.nvlink_gbs, ib_gbs=args.ib_gbs,
                     peak_tflops=args.peak_tflops, mfu=args.mfu):
        print(f"| {r['layout']} | {r['dp_gb']:.2f} | {r['tp_gb']:.2f} | {r['pp_gb']:.3f} | {r['compute_s']:.3f} | "
              f"{r['comm_s']:.3f} | {r['comm_over_compute']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
