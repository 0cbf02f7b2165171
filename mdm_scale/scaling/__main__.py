"""`python -m mdm_scale.scaling plan|fit`: plan an IsoFLOP sweep and run it, then fit its laws.

    python -m mdm_scale.scaling plan --config char_lm --objectives mdlm ar lomdm_paper --budgets 3e13 1e14 3e14 \\
        --depths 2 3 4 5 --out runs/scaling                            # writes the configs, prints the grid
    python -m mdm_scale.scaling plan ... --local [--workers 2]         # and runs them here (resumable)
    python -m mdm_scale.scaling plan ... --slurm "--nodes 1 --gpus-per-node 1" [--dry-run]   # one job array
    python -m mdm_scale.scaling fit runs/scaling/*/ --out docs/results/scaling
    python -m mdm_scale.scaling fit --points docs/results/scaling/points.json   # refit from a fit's saved input
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from mdm_scale.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _plan(args: argparse.Namespace) -> int:
    from mdm_scale.scaling.plan import format_grid, isoflop_grid, parse_shape, write_grid

    points, dropped = isoflop_grid(args.config, args.budgets, args.objectives, args.depths, aspect=args.aspect,
                                   shapes=[parse_shape(s) for s in args.shapes],
                                   min_steps=args.min_steps, max_epochs=args.max_epochs,
                                   overrides=args.overrides)
    if not points:
        print("error: no grid point has enough steps: " + "; ".join(dropped), file=sys.stderr)
        return 2
    paths = write_grid(points, args.config, Path(args.out), args.overrides)
    print(format_grid(points))
    for line in dropped:
        print(f"dropped: {line}")
    print(f"{len(paths)} configs in {Path(args.out) / 'configs'}; plan in {Path(args.out) / 'plan.json'}")
    if args.slurm is not None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("launchers_slurm", ROOT / "launchers" / "slurm.py")
        launcher = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(launcher)
        slurm_args = shlex.split(args.slurm)
        if "--job-name" not in slurm_args:
            slurm_args += ["--job-name", f"scaling-{Path(args.out).name}"]
        return launcher.main([*slurm_args, *(["--dry-run"] if args.dry_run else []), "--configs", *map(str, paths)])
    if args.local:
        from mdm_scale.run_queue import run_in_order

        runs = [(Path(args.out) / p.name, [sys.executable, str(ROOT / "launchers" / "local.py"), f"config={path}"],
                 Path(args.out) / f"{p.name}.log") for p, path in zip(points, paths)]  # a free worker takes the next
        failed = run_in_order(runs, threads=args.threads, jobs=args.workers, report=lambda s: print(s, flush=True))
        return 1 if failed else 0
    return 0


def _fit(args: argparse.Namespace) -> int:
    from mdm_scale.scaling.collect import RunReadError, point_of
    from mdm_scale.scaling.points import read_points
    from mdm_scale.scaling.report import fit_report

    if not args.run_dirs and not args.points:
        print("error: give run directories, --points files, or both", file=sys.stderr)
        return 2
    points, skipped = [], []
    for run_dir in args.run_dirs:  # first: a run read from its directory wins over a saved copy of it
        try:
            points.append(point_of(Path(run_dir)))
        except RunReadError as e:
            skipped.append(str(e))
    seen = {Path(p.run_dir).as_posix() for p in points}
    for path in args.points:
        try:
            saved = read_points(Path(path))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for point in saved:  # pooling must not count a run twice
            key = Path(point.run_dir).as_posix() if point.run_dir else None
            if key in seen:
                skipped.append(f"{path}: {point.run_dir} is already read (its run directory or an earlier file)")
                continue
            if key:
                seen.add(key)
            points.append(point)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    if not points:
        print("error: no run gave a scaling point", file=sys.stderr)
        return 2
    report = fit_report(points, samples=args.bootstrap, seed=args.seed, reference=args.reference,
                        out=Path(args.out) if args.out else None)
    print(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdm_scale.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="write (and run or submit) an IsoFLOP grid")
    plan.add_argument("--config", default="char_lm", help="base config (shapes and steps are set per point)")
    plan.add_argument("--objectives", nargs="+", default=["mdlm", "ar", "lomdm_paper"])
    plan.add_argument("--budgets", nargs="+", type=float, required=True, help="compute budgets C in FLOPs")
    plan.add_argument("--depths", nargs="*", type=int, default=[2, 3, 4, 5], help="model sizes by depth")
    plan.add_argument("--aspect", type=int, default=64, help="hidden = aspect x depth")
    plan.add_argument("--shapes", nargs="*", default=[], metavar="LxH",
                      help="further sizes as layers x hidden (e.g. 1x128), between the depth rule's")
    plan.add_argument("--min-steps", type=int, default=100)
    plan.add_argument("--max-epochs", type=float, default=4.0, help="drop points that would repeat the training "
                                                                    "split more often (0: no limit)")
    plan.add_argument("--out", required=True, help="directory of the configs, plan.json and the runs")
    plan.add_argument("--local", action="store_true", help="run the points one after another here (resumable)")
    plan.add_argument("--threads", type=int, default=1, help="threads per local run")
    plan.add_argument("--workers", type=int, default=1, help="local runs side by side (two 1-thread runs use two "
                                                             "cores better than one 2-thread run)")
    plan.add_argument("--slurm", default=None, metavar="ARGS", help="submit as one job array: launchers/slurm.py "
                                                                    "options, quoted")
    plan.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch script only")
    plan.add_argument("overrides", nargs="*", help="key=value overrides applied to every point")
    fit = sub.add_parser("fit", help="fit IsoFLOP minima and the parametric law to finished runs")
    fit.add_argument("run_dirs", nargs="*", help="finished run directories")
    fit.add_argument("--points", nargs="+", default=[], metavar="JSON",
                     help="points.json files an earlier `fit --out` wrote (pooled with the run directories)")
    fit.add_argument("--out", default=None, help="directory for fit.json and fit.png")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the runs")
    fit.add_argument("--reference", default="mdlm", help="objective the compute multipliers are relative to")
    fit.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        return _plan(args) if args.command == "plan" else _fit(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
