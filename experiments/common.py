"""Pieces every experiment script needs: token datasets as MDS shards, one training run with overrides and its
held-out NELBO curve, reading learned exponents back from a checkpoint, order statistics and seed summaries.

Experiments import this module (`from common import ...` when run as `python experiments/NAME.py`, since the
script's directory is on sys.path; `experiments.common` also works from the repository root).

    write_token_dataset(root, {"train": x_train, "heldout": x_heldout}, offset=ord("a"))
    cfg = run_config(["objective=mdlm", ...], data_dir=root, run_dir=..., name=..., seed=0, s=TrainSettings())
    result = train_run(cfg)                            # {"final_nelbo", "evals", "losses", "curve", "wall_s", ...}
    w = learned_exponents(cfg, run_dir / "checkpoints", x_heldout)   # None for fixed schedules
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.stats

"""Schedule kinds whose exponents are parameters (read back by `learned_exponents`)."""

CONTROL_OVERRIDES = {
    "mdlm_is": ("objective=mdlm", "objective.time_power=0.2", "objective.t_min=0.0"),
    "mdlm_order": ("objective=mdlm", "objective.schedule.kind=polynomial", "objective.schedule.exponent=1.0",
                   "objective.estimator=order", "objective.t_min=0.0"),
}
"""Controls that separate a learned order from the learned presets' estimator. mdlm_is: MDLM's schedule trained
and evaluated with a heavy-tailed time sampler (time_power 0.2 importance sampling, t_min 0). mdlm_order: MDLM's
order distribution (polynomial, w = 1: uniform orders) trained with the order form of the estimator, as the learned
presets are (docs/objective.md)."""


def limit_threads(n: int = 1) -> None:
    """One intra-op thread (shared CPU machines: several experiments at once must not oversubscribe cores)."""
    import torch

    torch.set_num_threads(n)


def machine_load() -> dict:
    """CPU count and load averages (1, 5, 15 min) at call time: wall times on a shared box need them."""
    try:
        load = list(os.getloadavg())
    except OSError:  # not available on this platform
        load = []
    return {"cpu_count": os.cpu_count(), "loadavg_1_5_15": load}


# ------------------------------------------------------------------------------------------------- datasets
def write_token_dataset(root: str | os.PathLike, splits: dict[str, np.ndarray], *, tokenizer: str = "byte",
                        offset: int = 0) -> dict:
    """Write each split ([n, L] integer ids; ids + `offset` must be valid ids of `tokenizer`) as MDS shards with
    the tokenizer's fingerprint under root/<split>, so that `data.path=root data.tokenizer=<tokenizer>` trains on
    it (the trainer reads `train` and `heldout`). Existing split directories are replaced.

    Returns {split: {"path", "num_sequences", "seq_len"}} plus "tokenizer" and "fingerprint"."""
    from data_pipeline.shard_writer import write_mds
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    fingerprint = tok.fingerprint()
    root = Path(root)
    info: dict = {"tokenizer": tokenizer, "fingerprint": fingerprint}
    for split, x in splits.items():
        ids = np.asarray(x, dtype=np.int64) + offset
        if ids.ndim != 2:
            raise ValueError(f"split {split!r}: expected [num, seq_len] ids, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= tok.vocab_size:
            raise ValueError(f"split {split!r}: ids outside [0, {tok.vocab_size}) of tokenizer {tokenizer!r}")
        path = write_mds(ids.astype(np.uint32), root / split, tokenizer_fingerprint=fingerprint, overwrite=True)
        info[split] = {"path": str(path), "num_sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
    return info


# ---------------------------------------------------------------------------------------------------- runs
@dataclass
class TrainSettings:
    """The model/optimizer/eval fields shared by small CPU experiments (each maps to one config override)."""

    seq_len: int = 16
    steps: int = 300
    eval_every: int = 100
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 20
    eval_batches: int = 16
    eval_time_samples: int = 4
    schedule_lr_mult: float = 1.0
    """optimizer.schedule_lr_mult: the learned schedule's parameters at this multiple of lr."""


def override_settings(settings, args, names: Iterable[str]) -> list[str]:
    """settings.<name> = args.<name> for every name whose argument was given (not None), in the order of
    `names`; returns the names that were set. (Replaces one `if args.x is not None: s.x = args.x` per option.)"""
    changed = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            if not hasattr(settings, name):
                raise AttributeError(f"{type(settings).__name__} has no field {name!r}")
            setattr(settings, name, value)
            changed.append(name)
    return changed


def run_config(objective_overrides: Sequence[str], *, data_dir: str | os.PathLike, run_dir: str | os.PathLike,
               name: str, seed: int, s: TrainSettings, tokenizer: str = "byte", base: str = "tiny",
               extra: Sequence[str] = ()):
    """The RunConfig of one CPU training on the dataset at `data_dir`: config `base`, then the objective
    overrides, then the settings `s`, then `extra` (last wins). No wandb, no progress bar, no samples."""
    from mdm_scale.config import load_config

    return load_config(base, [
        *objective_overrides,
        f"data.path={data_dir}", f"data.tokenizer={tokenizer}", f"data.seq_len={s.seq_len}",
        f"data.micro_batch_size={s.batch}",
        f"model.num_layers={s.layers}", f"model.hidden_size={s.hidden}", f"model.num_attention_heads={s.heads}",
        f"model.scheduler_head_size={s.hidden}", f"optimizer.lr={s.lr}", f"optimizer.warmup_steps={s.warmup}",
        f"optimizer.schedule_lr_mult={s.schedule_lr_mult}",
        "logging.wandb=false", "logging.progress=false", f"logging.log_every={max(1, s.steps)}",
        "sampling.num_samples=0", f"train.steps={s.steps}", f"train.eval_every={s.eval_every}",
        f"train.eval_batches={s.eval_batches}", f"train.eval_time_samples={s.eval_time_samples}",
        f"train.seed={seed}", "train.device=cpu", "checkpoint.resume=false", f"run_dir={run_dir}", f"name={name}",
        *extra,
    ])


def train_run(cfg) -> dict:
    """Train `cfg` in-process with `mdm_scale.train.train` (the launcher's loop) and collect its numbers.

    Returns {"final_nelbo": held-out NELBO at the last evaluation, "curve": [(step, nelbo), ...],
    "evals": {"step": nelbo}, "losses": {"step": training loss}, "wall_s", "checkpoint", "load_after"}.
    The experiments' configs are fresh runs (checkpoint.resume=false): the run directory of an earlier run of the
    experiment is removed first, since a run directory belongs to one run."""
    from mdm_scale.train import train

    if not cfg.checkpoint.resume:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    start = time.time()
    result = train(cfg)
    wall = time.time() - start
    curve = sorted(result.evals.items())
    return {"final_nelbo": curve[-1][1], "curve": [[int(k), float(v)] for k, v in curve],
            "evals": {str(k): v for k, v in curve}, "losses": {str(k): v for k, v in sorted(result.losses.items())},
            "wall_s": wall, "checkpoint": result.checkpoint, "load_after": machine_load()["loadavg_1_5_15"]}


def load_trained(cfg, checkpoint_dir: str | os.PathLike):
    """(denoiser, schedule) of a single-process run's latest checkpoint, in eval mode."""
    from data_pipeline.tokenizer import load_tokenizer
    from mdm_scale.model import build_model
    from parallel.checkpoint import latest_checkpoint
    from parallel.consolidate import model_layout, to_local
    from parallel.distributed import init_distributed
    from parallel.engine import safe_checkpoint_globals

    dims = init_distributed(device="cpu", seed=cfg.train.seed)
    model = build_model(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size, dims)
    ckpt = latest_checkpoint(Path(checkpoint_dir), "tp0-pp0-dp0", safe_globals=safe_checkpoint_globals())
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    model.load_state_dict(to_local(ckpt.model, model_layout(model)))
    model.eval()
    return model["denoiser"], model["schedule"]


def learned_exponents(cfg, checkpoint_dir: str | os.PathLike, x: np.ndarray | None = None,
                      per_sample: bool = False) -> np.ndarray | None:
    """Learned exponents w of a trained run's latest checkpoint; None for fixed schedules.

    MDM-LS: the per-position exponents [L]. LoMDM: the forward scheduler's w_i(x) on the token ids `x` [n, L]
    (clean-x features through the denoiser, then the head, as in training): their mean over x [L], or all of
    them [n, L] with per_sample=True."""
    import torch

    from mdm_scale.config import LEARNED_KINDS

    kind = cfg.objective.schedule.kind
    if kind not in LEARNED_KINDS:
        return None
    denoiser, schedule = load_trained(cfg, checkpoint_dir)
    with torch.no_grad():
        if kind == "mdm_ls":
            w = schedule.exponents(cfg.data.seq_len).double().numpy()
            return np.tile(w, (len(x), 1)) if per_sample and x is not None else w
        if x is None:
            raise ValueError("LoMDM exponents depend on x: pass the token ids")
        x0 = torch.as_tensor(np.asarray(x).astype(np.int64))
        hidden = denoiser(x0, torch.zeros(x0.shape[0]))
        w = schedule.exponents(denoiser.scheduler_logits("forward_scheduler", hidden)).double().numpy()
        return w if per_sample else w.mean(0)


# --------------------------------------------------------------------------------------------- statistics
def rank(a) -> np.ndarray:
    """Average ranks from 0 (ties share their mean rank)."""
    return scipy.stats.rankdata(np.asarray(a, dtype=float), method="average") - 1.0


def spearman(a, b) -> float:
    """Spearman rank correlation (0 when either argument is constant)."""
    if np.ptp(np.asarray(a, dtype=float)) == 0 or np.ptp(np.asarray(b, dtype=float)) == 0:
        return 0.0
    return float(scipy.stats.spearmanr(a, b).statistic)


def generation_order_stats(w, samples: int = 20000, seed: int = 0) -> dict:
    """Monte-Carlo over the order distribution the exponents define. Returns the mean generation step per
    position, the probability that a position is generated before its left neighbour (each adjacent pair
    right-to-left), and the probability of the exact right-to-left order. `w` is [L] or per-sample [n, L]."""
    from mdm_scale.plots import sample_generation_steps

    step = sample_generation_steps(w, samples, seed)
    return {"mean_generation_step": step.mean(0).tolist(),
            "p_right_neighbour_first": float((step[:, 1:] < step[:, :-1]).mean()),
            "p_exact_right_to_left": float((np.diff(step, axis=1) == -1).all(axis=1).mean())}


def mean_std(values) -> dict:
    """{"values", "mean", "std"} with the sample std (ddof 1; 0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return {"values": v.tolist(), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def compare_to_baseline(base: Sequence[float], other: Sequence[float]) -> dict:
    """How far `other` is below `base` (lower is better), against seed noise.

    margin = mean(base) - mean(other); seed_noise = the larger of the two sample stds; paired differences
    base_s - other_s when both have the same number of seeds (same seed = same data order and noise).
    beats_beyond_noise: margin > seed_noise and every paired difference > 0."""
    b, o = mean_std(base), mean_std(other)
    margin, noise = b["mean"] - o["mean"], max(b["std"], o["std"])
    out = {"margin": margin, "seed_noise": noise}
    diffs = None
    if len(b["values"]) == len(o["values"]):
        diffs = np.array(b["values"]) - np.array(o["values"])
        out["paired_differences"] = diffs.tolist()
    out["beats_beyond_noise"] = bool(margin > noise and (diffs is None or (diffs > 0).all()))
    return out
