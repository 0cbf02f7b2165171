"""IsoFLOP grids: for each compute budget C, objective and model size, the run that spends exactly C.

Sizes follow a depth rule (Kaplan et al.'s fixed aspect ratio): depth L gives hidden h = aspect * L (a multiple of
the head width 64), heads h / 64, FFN 4h. A point's training tokens are D = C / F(model, objective), with F the
project's FLOPs per data token (mdm_scale/flops.py: LoMDM's clean pass, the paper's two draws and its scheduler
layers included), so objectives are compared at equal compute, not equal tokens. D is rounded to whole optimizer
steps of the base config's batch; a point needs at least `min_steps` steps (fewer would be mostly warm-up) and is
dropped with its reason otherwise. Warm-up is the base config's, capped at a tenth of the steps; the cosine runs
over the point's own steps (Chinchilla: a schedule matched to each run's length).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mdm_scale.config import ConfigError, RunConfig, load_config, to_yaml
from mdm_scale.flops import non_embedding_params, training_flops_per_token

HEAD_DIM = 64


@dataclass(frozen=True)
class GridPoint:
    """One run of an IsoFLOP grid."""

    objective: str
    budget: float
    """The compute budget C (FLOPs) this point spends."""
    num_layers: int
    hidden_size: int
    params: int
    """Non-embedding parameters N."""
    flops_per_token: float
    steps: int
    tokens: int
    """Training tokens D = steps x tokens per step."""

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def name(self) -> str:
        return f"{self.objective}-C{self.budget:.1e}-L{self.num_layers}h{self.hidden_size}".replace("+", "")

    def overrides(self, warmup_steps: int) -> list[str]:
        return [f"objective={self.objective}", f"model.num_layers={self.num_layers}",
                f"model.hidden_size={self.hidden_size}", f"model.num_attention_heads={self.hidden_size // HEAD_DIM}",
                f"train.steps={self.steps}", f"optimizer.warmup_steps={min(warmup_steps, self.steps // 10)}"]


def shape_for_depth(depth: int, aspect: int) -> tuple[int, int]:
    """(layers, hidden) of the depth rule h = aspect * L, h a multiple of HEAD_DIM."""
    hidden = aspect * depth
    if depth < 1 or hidden % HEAD_DIM:
        raise ConfigError(f"depth {depth} x aspect {aspect} = hidden {hidden}, not a positive multiple of {HEAD_DIM}")
    return depth, hidden


def isoflop_grid(base: str, budgets: list[float], objectives: list[str], depths: list[int], *, aspect: int = 64,
                 min_steps: int = 100, overrides: list[str] = ()) -> tuple[list[GridPoint], list[str]]:
    """The grid's points and, for each dropped (budget, objective, depth), one line saying why."""
    from data_pipeline.tokenizer import load_tokenizer

    points, dropped = [], []
    for objective in objectives:
        for depth in depths:
            layers, hidden = shape_for_depth(depth, aspect)
            cfg = load_config(base, [*overrides, f"objective={objective}", f"model.num_layers={layers}",
                                     f"model.hidden_size={hidden}", f"model.num_attention_heads={hidden // HEAD_DIM}"])
            vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
            per_token = training_flops_per_token(cfg, vocab)
            per_step = cfg.data.micro_batch_size * cfg.data.grad_accumulation * cfg.data.seq_len
            ffn = cfg.model.ffn_hidden_size or 4 * hidden
            for budget in budgets:
                steps = round(budget / (per_token * per_step))
                if steps < min_steps:
                    dropped.append(f"{objective} L{layers} h{hidden} at C={budget:.2e}: {steps} steps < {min_steps}")
                    continue
                points.append(GridPoint(objective, budget, layers, hidden, non_embedding_params(layers, hidden, ffn),
                                        per_token, steps, steps * per_step))
    return points, dropped


def write_grid(points: list[GridPoint], base: str, out: Path, overrides: list[str] = ()) -> list[Path]:
    """One resolved config per point (<out>/configs/<name>.yaml, run_dir <out>/<name>) and <out>/plan.json; returns
    the config paths in grid order. Rewriting the same grid gives the same files, so a plan can be rerun."""
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    paths = []
    for point in points:
        warmup = load_config(base, list(overrides)).optimizer.warmup_steps
        cfg: RunConfig = load_config(base, [*overrides, *point.overrides(warmup), f"run_dir={out / point.name}",
                                            f"name={point.name}"])
        path = out / "configs" / f"{point.name}.yaml"
        path.write_text(to_yaml(cfg))
        paths.append(path)
    plan = [{**asdict(p), "flops": p.flops, "name": p.name, "config": str(path)} for p, path in zip(points, paths)]
    (out / "plan.json").write_text(json.dumps({"base": base, "overrides": list(overrides), "points": plan}, indent=1))
    return paths


def format_grid(points: list[GridPoint]) -> str:
    """A markdown table of the grid, with each point's FLOPs against its budget."""
    rows = ["| objective | budget C | layers x hidden | N (non-emb.) | FLOPs/token | steps | tokens D | FLOPs / C |",
            "|---|---|---|---|---|---|---|---|"]
    for p in points:
        rows.append(f"| {p.objective} | {p.budget:.2e} | {p.num_layers} x {p.hidden_size} | {p.params:,} | "
                    f"{p.flops_per_token:.3e} | {p.steps:,} | {p.tokens:,} | {p.flops / p.budget:.4f} |")
    return "\n".join(rows)
