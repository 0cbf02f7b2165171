"""`python -m mdm_scale COMMAND ...`: one entry point for the inference-side tools.

    python -m mdm_scale sample CKPT [--policy eb ...]           mdm_scale.sampling
    python -m mdm_scale eval CKPT [--time-samples 32]           mdm_scale.evaluation
    python -m mdm_scale export CKPT OUT_DIR                     mdm_scale.export
    python -m mdm_scale tune-schedule CKPT --nfe 8 --scorer AR_CKPT   mdm_scale.tune_schedule
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sample": ("mdm_scale.sampling", "generate samples from a checkpoint"),
    "eval": ("mdm_scale.evaluation", "held-out NELBO of a checkpoint"),
    "export": ("mdm_scale.export", "write a serving directory"),
    "tune-schedule": ("mdm_scale.tune_schedule", "search the Beta(a, b) time grid for a given NFE"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<14} {help}" for name, (_, help) in COMMANDS.items())
        print(f"usage: python -m mdm_scale COMMAND [ARGS]  (COMMAND --help for its options)\n\ncommands:\n{usage}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    if argv[0] == "export":
        import torch

        torch.set_grad_enabled(False)  # as `python -m mdm_scale.export` does
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
