"""Submit mdm_scale to SLURM through submitit: one task per GPU, preemption-safe, sweeps as job arrays.

    python launchers/slurm.py --nodes 16 config=owt_1b
    python launchers/slurm.py --nodes 16 --dry-run config=owt_1b              # print the sbatch script, submit nothing
    python launchers/slurm.py --nodes 16 --plan config=owt_1b                 # memory, checkpoint, comm per rank
    python launchers/slurm.py --nodes 2 --array objective=mdlm,lomdm --array model.num_layers=12,24 config=owt_small
    python launchers/slurm.py --gpus-per-node 0 --tasks-per-node 2 config=tiny   # CPU tasks (gloo)
    python launchers/slurm.py --nodes 1 --configs runs/scaling/configs/*.yaml     # one array element per file

Everything after the options is `config=<name>` and `key=value` overrides, as for launchers/local.py. The layout
(TP x PP x DP = nodes x tasks per node, heads divisible by TP, layers by PP) is checked before anything is
submitted. The resolved config goes to <run_dir>/config.yaml, submitit's logs and pickles to <run_dir>/slurm/.
On SIGUSR1 (sent `--signal-delay` seconds before the time limit, on preemption, or by `scancel --signal=USR1`)
the job checkpoints at the next step, requeues itself and resumes from that checkpoint (mdm_scale/jobs.py).
With `--container-image` every task runs inside that image through pyxis/enroot (see docker/README.md).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# submitit reads the preemption signal when it is imported: `#SBATCH --signal=USR1@<delay>`, handled as USR1.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

from mdm_scale.config import ConfigError, RunConfig, check_layout, load_config  # noqa: E402


def parse_time(value: str) -> int:
    """SLURM time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes (>= 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid --time {value!r}; use minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is None and b is None:  # "90": minutes
        minutes = a
    elif days is None and c is None:  # "MM:SS"
        minutes = a + (b > 0)
    elif days is None:  # "HH:MM:SS"
        minutes = 60 * a + b + (c > 0)
    else:  # "D-HH[:MM[:SS]]"
        minutes = 24 * 60 * days + 60 * a + (b or 0) + bool(c)
    return max(1, minutes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launchers/slurm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 = CPU tasks (gloo)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (1 on CPU)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem", default=None, help="per node, e.g. 480G")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--time", type=parse_time, default=parse_time("04:00:00"), help="per job (default 04:00:00)")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends SIGUSR1 (checkpoint + requeue)")
    p.add_argument("--max-requeues", type=int, default=100, help="time-limit requeues before giving up")
    p.add_argument("--job-name", default=None, help="default: the config's name")
    p.add_argument("--container-image", default=None, help="pyxis/enroot image (srun --container-image)")
    p.add_argument("--container-mounts", default=None, help="srun --container-mounts (default: the repo)")
    p.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="sweep: one job-array element per combination of the listed values (repeatable)")
    p.add_argument("--array-parallelism", type=int, default=64, help="array elements running at once")
    p.add_argument("--configs", nargs="+", default=None, metavar="YAML",
                   help="one job-array element per config file, each with its own run_dir (what `python -m "
                        "mdm_scale.scaling plan` writes); the key=value overrides apply to every one")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and layout; submit nothing")
    p.add_argument("--plan", action="store_true",
                   help="print what each rank will hold (parameters, memory, checkpoint, communication; "
                        "parallel/plan.py); submit nothing")
    p.add_argument("overrides", nargs="*", help="config=<name> and key=value overrides")
    return p


def sweep(arrays: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x,y'] -> [['a=1', 'b=x'], ['a=1', 'b=y'], ['a=2', 'b=x'], ['a=2', 'b=y']]."""
    axes = []
    for spec in arrays:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--array {spec!r} is not KEY=V1,V2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _slug(overrides: list[str]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._=-]+", "-", o).replace("=", "-") for o in overrides)


def resolve_configs(args: argparse.Namespace) -> list[RunConfig]:
    """One RunConfig per array element (one without --array or --configs), each with its own run directory."""
    name, overrides = "tiny", []
    for item in args.overrides:
        if item.startswith("config="):
            name = item.split("=", 1)[1]
        else:
            overrides.append(item)
    if args.configs:
        if args.array or name != "tiny":
            raise ConfigError("--configs names every element's config; it takes no --array and no config=")
        return [load_config(path, overrides) for path in args.configs]
    combos = sweep(args.array)
    configs = []
    for combo in combos:
        cfg = load_config(name, [*overrides, *combo])
        if len(combos) > 1:  # the run_dir becomes the sweep's root
            cfg.run_dir = str(Path(cfg.run_dir) / _slug(combo))
        configs.append(cfg)
    return configs


def tasks_per_node(args: argparse.Namespace) -> int:
    if args.tasks_per_node is not None:
        return args.tasks_per_node
    return args.gpus_per_node if args.gpus_per_node > 0 else 1


def build_executor(args: argparse.Namespace, folder: Path, job_name: str):
    """A submitit SlurmExecutor with the cluster options (one task per GPU; requeue allowed). For --dry-run it
    skips submitit's check for `srun`, so the script and layout can be checked on a machine without SLURM."""
    import submitit

    class DryRunExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # submitit refuses to build an executor where `srun` is missing
            return 1

    python = "python" if args.container_image else sys.executable  # the image's interpreter inside a container
    kind = DryRunExecutor if args.dry_run else submitit.SlurmExecutor
    executor = kind(folder=folder / "%j", max_num_timeout=args.max_requeues, python=python)
    params = dict(job_name=job_name, nodes=args.nodes, ntasks_per_node=tasks_per_node(args), time=args.time,
                  signal_delay_s=args.signal_delay, array_parallelism=args.array_parallelism,
                  additional_parameters={"requeue": True},
                  setup=[f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}",
                         "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"])
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    optional = dict(cpus_per_task=args.cpus_per_task, mem=args.mem, partition=args.partition, account=args.account,
                    qos=args.qos, constraint=args.constraint)
    params.update({k: v for k, v in optional.items() if v is not None})
    if args.exclusive:
        params["exclusive"] = True
    if args.container_image:
        mounts = args.container_mounts or f"{ROOT}:{ROOT}"
        params["srun_args"] = [f"--container-image={args.container_image}", f"--container-mounts={mounts}",
                               f"--container-workdir={ROOT}"]
    executor.update_parameters(**params)
    return executor


def layout_summary(args: argparse.Namespace, cfg: RunConfig) -> str:
    world = args.nodes * tasks_per_node(args)
    dp = check_layout(cfg, world)
    global_batch = cfg.data.micro_batch_size * cfg.data.grad_accumulation * dp
    device = f"{args.gpus_per_node} GPUs" if args.gpus_per_node else "CPU"
    return (f"{args.nodes} node(s) x {tasks_per_node(args)} tasks ({device} per node) = {world} ranks = "
            f"TP {cfg.parallel.tensor_parallel} x PP {cfg.parallel.pipeline_parallel} x DP {dp}; "
            f"ZeRO stage {cfg.parallel.zero_stage}; global batch {global_batch} sequences "
            f"({global_batch * cfg.data.seq_len:,} tokens)")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = resolve_configs(args)
        layouts = [layout_summary(args, cfg) for cfg in configs]
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        from parallel.plan import Layout, print_plan

        for cfg in configs:
            p = cfg.parallel
            print(print_plan(cfg, Layout(args.nodes, tasks_per_node(args), p.tensor_parallel, p.pipeline_parallel,
                                         p.zero_stage, gpu=args.gpus_per_node > 0)))
        return 0
    first = configs[0]
    job_name = args.job_name or first.name
    folder = Path(first.run_dir if len(configs) == 1 else Path(first.run_dir).parent).resolve() / "slurm"
    executor = build_executor(args, folder, job_name)
    if args.dry_run:
        inner = executor  # submitit's own rendering: exactly what sbatch would get
        if len(configs) > 1:
            inner.parameters["map_count"] = len(configs)
        print(inner._make_submission_file_text(inner._submitit_command_str, uid="dry-run"))
        for cfg, layout in zip(configs, layouts):
            print(f"# run_dir {cfg.run_dir}: {layout}")
        return 0

    from mdm_scale.jobs import TrainJob
    from mdm_scale.run_directory import RunDirError, check_run_directory

    try:  # refused before anything is queued: a run directory belongs to one run
        for cfg in configs:
            check_run_directory(cfg)
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(configs) == 1:
        jobs = [executor.submit(TrainJob(first))]
    else:
        with executor.batch():
            jobs = [executor.submit(TrainJob(cfg)) for cfg in configs]
    for job, cfg, layout in zip(jobs, configs, layouts):
        print(f"submitted job {job.job_id}: {layout}")
        print(f"  run dir {Path(cfg.run_dir).resolve()}  log {job.paths.stdout}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
