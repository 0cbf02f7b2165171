"""A training step of a trained checkpoint with and without flushing subnormal floats, side by side in one process.

    scripts/in_venv.sh python bench/denormals.py runs/char_lm/mdlm-s0/checkpoints/step_00002500 [--reps 6]

x86 CPUs compute on subnormal floats (|x| < 1.2e-38) about 100x slower than on normal ones. A freshly initialised
model makes few; a trained one's confident softmaxes make many, so CPU training slowed down as it learned until
parallel.distributed.init_distributed set `torch.set_flush_denormal(True)` for CPU runs. This measures the
denoiser's forward and backward through the NELBO on 16 held-out windows, alternating the two settings
(one thread), and prints the median seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--reps", type=int, default=6, help="timed pairs of steps per setting")
    p.add_argument("--windows", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from data_pipeline.datasets import open_split, split_document_ids
    from mdm_scale.model import load_for_inference
    from mdm_scale.objective import draw_noise, nelbo
    from mdm_scale.time_sampling import TimeSampler

    cfg, tokenizer, model, _ = load_for_inference(args.checkpoint)
    denoiser, schedule = model["denoiser"], model["schedule"]
    denoiser.train()
    split = open_split(Path(cfg.data.path), "heldout", tokenizer, seq_len=cfg.data.seq_len,
                       batch_size=args.windows, seed=0)
    x, _ = split_document_ids(split.batch_at(0, 0))
    sampler = TimeSampler.from_config(cfg.objective)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        t, t_weight, uniforms = draw_noise(x.shape[0], x.shape[1], sampler, generator, "cpu")
        nelbo(denoiser, schedule, x, t, t_weight, uniforms).loss.backward()
        denoiser.zero_grad(set_to_none=True)

    seconds = {False: [], True: []}
    step()  # warm-up
    for _ in range(args.reps):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            start = time.perf_counter()
            step()
            step()
            seconds[flush].append((time.perf_counter() - start) / 2)
    torch.set_flush_denormal(True)
    keep, flush = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(json.dumps({"checkpoint": args.checkpoint, "windows": args.windows, "seq_len": cfg.data.seq_len,
                      "median_s_per_step_subnormals_kept": keep, "median_s_per_step_flushed": flush,
                      "kept_over_flushed": keep / flush}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
