"""Run mdm_scale on this machine (CPU or GPUs):

    python launchers/local.py config=tiny [objective=lomdm] [key=value ...]
    torchrun --nproc-per-node 2 launchers/local.py config=tiny parallel.tensor_parallel=2

Only parses, builds, trains and closes; the loop lives in mdm_scale/train.py. SIGUSR1 (or SIGUSR2) stops the run
after the current step with a checkpoint; the same command resumes it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdm_scale.cli import expected_errors  # noqa: E402
from mdm_scale.config import load_config  # noqa: E402
from mdm_scale.jobs import run  # noqa: E402


@expected_errors
def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    name = "tiny"
    overrides = []
    for arg in argv:
        if arg.startswith("config="):
            name = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    result = run(load_config(name, overrides))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    evals = result["evals"]
    if len(evals) > 1:
        first, last = evals[min(evals)], evals[max(evals)]
        print(f"eval NELBO {first:.3f} -> {last:.3f} ({100 * (first - last) / first:.1f}% lower)")
    if result["stopped_by_signal"]:
        print(f"stopped at step {result['step']} by a signal; run the same command to resume")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
