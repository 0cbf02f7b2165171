"""Finished runs as scaling points: (objective, N, D, C, held-out NELBO) read from each run directory.

N, D and C are recomputed from the run's own config.yaml and its final checkpoint's step with the planner's
formula (mdm_scale/flops.py). A run still short of its train.steps is refused: its learning rate has not annealed,
so its loss is not the one its tokens buy (Chinchilla fits each point at the end of its own schedule). The loss is
the held-out NELBO (nats per token) the run logged at that step, the unbiased order form for a learned
schedule trained with the time form (mdm_scale.evaluation.truncation_biased); a run without it is refused by name.
"""

from __future__ import annotations

from pathlib import Path

from mdm_scale.config import load_config
from mdm_scale.evaluation import truncation_biased
from mdm_scale.flops import non_embedding_params, training_flops_per_token
from mdm_scale.metrics import read_metrics
from mdm_scale.scaling.points import Point
from parallel.checkpoint import checkpoint_step, list_checkpoints


class RunReadError(ValueError):
    """A run directory cannot give a scaling point."""


def objective_name(cfg, run_dir: Path) -> str:
    """The preset a run was made from: the planner names a run <objective>-C<budget>-..., the language benchmark
    <objective>-s<seed>; the config alone does not say (a preset is a set of values)."""
    if "-C" in cfg.name:
        return cfg.name.split("-C")[0]
    return run_dir.name.split("-s")[0]


def point_of(run_dir: Path) -> Point:
    from data_pipeline.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise RunReadError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_config(run_dir / "config.yaml")
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise RunReadError(f"{run_dir}: no checkpoint yet")
    step = checkpoint_step(checkpoints[-1])
    if step < cfg.train.steps:  # its learning rate has not annealed: the loss would be too high for its tokens
        raise RunReadError(f"{run_dir}: still training (checkpoint at step {step} of {cfg.train.steps})")
    # A learned schedule under the time form logs an optimistic NELBO (t_min^w of each position's loss dropped)
    # and the unbiased order form beside it: the law is fitted to the unbiased one.
    key = "eval/nelbo_order_form" if truncation_biased(cfg.objective) else "eval/nelbo"
    evals = {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}
    if step not in evals:
        raise RunReadError(f"{run_dir}: no held-out NELBO ({key}) logged at its checkpoint step {step}")
    if not (evals[step] > 0 and evals[step] < float("inf")):
        raise RunReadError(f"{run_dir}: held-out NELBO {evals[step]} at step {step} (diverged?)")
    vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    m = cfg.model
    tokens = step * cfg.data.micro_batch_size * cfg.data.grad_accumulation * cfg.data.seq_len
    return Point(objective=objective_name(cfg, run_dir),
                 params=float(non_embedding_params(m.num_layers, m.hidden_size,
                                                   m.ffn_hidden_size or 4 * m.hidden_size)),
                 tokens=float(tokens), flops=training_flops_per_token(cfg, vocab) * tokens, loss=float(evals[step]),
                 run_dir=str(run_dir))
