"""IsoFLOP grids: for each compute budget C, objective and model size, the run that spends exactly C.

Sizes follow a depth rule (Kaplan et al.'s fixed aspect ratio): depth L gives hidden h = aspect * L (a multiple of
the head width 64), heads h / 64, FFN 4h. Explicit shapes ("LxH") add sizes between the rule's, which grow as L^3
(an 8x step from depth 1 to 2 is too coarse for a parabola whose minimum falls there). A point's training tokens are
D = C / F(model, objective), with F the project's FLOPs per data token (mdm_scale/flops.py: LoMDM's clean pass, the
paper's two draws and its scheduler layers included), so objectives are compared at equal compute, not equal tokens.
D is rounded to whole optimizer steps of the base config's batch; a point needs at least `min_steps` steps (fewer
would be mostly warm-up) and is dropped with its reason otherwise. A point that would read its training split more
than `max_epochs` times is dropped too: repeated data is worth less than fresh data beyond ~4 epochs (Muennighoff et
al. 2023, "Scaling Data-Constrained Language Models"), which would bend the fitted law by the data, not by the
model. Warm-up is the base config's, capped at a tenth of the steps; the cosine runs over the point's own steps
(Chinchilla: a schedule matched to each run's length).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.shard_check import ShardError
from mdm_scale.config import ConfigError, RunConfig, load_config, to_yaml
from mdm_scale.flops import non_embedding_params, training_flops_per_token
from parallel.files import atomic_write

HEAD_DIM = 64


def num_heads(hidden: int) -> int:
    """Heads of width HEAD_DIM; a model narrower than one head has a single head of its own width."""
    return max(1, hidden // HEAD_DIM)


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
    epochs: float
    """D over the tokens of one epoch of the training split."""

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def name(self) -> str:
        return f"{self.objective}-C{self.budget:.1e}-L{self.num_layers}h{self.hidden_size}".replace("+", "")

    def overrides(self, warmup_steps: int) -> list[str]:
        return [f"objective={self.objective}", f"model.num_layers={self.num_layers}",
                f"model.hidden_size={self.hidden_size}", f"model.num_attention_heads={num_heads(self.hidden_size)}",
                f"train.steps={self.steps}", f"optimizer.warmup_steps={min(warmup_steps, self.steps // 10)}"]


def shape_for_depth(depth: int, aspect: int) -> tuple[int, int]:
    """(layers, hidden) of the depth rule h = aspect * L, h a multiple of HEAD_DIM."""
    hidden = aspect * depth
    if depth < 1 or hidden % HEAD_DIM:
        raise ConfigError(f"depth {depth} x aspect {aspect} = hidden {hidden}, not a positive multiple of {HEAD_DIM}")
    return depth, hidden


def training_split_tokens(cfg: RunConfig, tokenizer) -> int | None:
    """Tokens of one epoch of the training split (windows x seq_len, from its manifest); None for data.remote.
    The embedded corpus is packed here if it was not yet (the first run would do it anyway)."""
    from data_pipeline.datasets import embedded_corpus_shards
    from data_pipeline.shard_check import read_manifest

    if cfg.data.remote:
        return None
    root = (Path(cfg.data.path).expanduser() if cfg.data.path else
            embedded_corpus_shards(cfg.data.source, tokenizer, cfg.data.seq_len, Path(cfg.data.cache_dir).expanduser()))
    manifest = read_manifest(root / "train")
    return int(manifest["num_samples"]) * int(manifest["seq_len"])


def parse_shape(text: str) -> tuple[int, int]:
    """"LxH" (layers x hidden) as (L, H): H a multiple of HEAD_DIM, or below it (one narrower head), e.g. 1x32."""
    try:
        layers, hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"shape {text!r}: expected LAYERSxHIDDEN, e.g. 1x128") from None
    if layers < 1 or hidden < 1 or (hidden > HEAD_DIM and hidden % HEAD_DIM):
        raise ConfigError(f"shape {text!r}: needs layers >= 1 and hidden a multiple of {HEAD_DIM} or below it")
    return layers, hidden


def isoflop_grid(base: str, budgets: list[float], objectives: list[str], depths: list[int], *, aspect: int = 64,
                 shapes: list[tuple[int, int]] = (), min_steps: int = 100, max_epochs: float = 4.0,
                 overrides: list[str] = ()) -> tuple[list[GridPoint], list[str]]:
    """The grid's points and, for each dropped (budget, objective, shape), one line saying why (max_epochs 0: no
    limit). Sizes are the depth rule's for `depths` and the explicit (layers, hidden) `shapes`, by increasing N."""
    from data_pipeline.tokenizer import load_tokenizer

    base_cfg = load_config(base, list(overrides))
    tokenizer = load_tokenizer(base_cfg.data.tokenizer)
    vocab = tokenizer.vocab_size
    try:
        epoch_tokens = training_split_tokens(base_cfg, tokenizer)
    except ShardError as e:
        if max_epochs:
            raise ConfigError(f"--max-epochs needs the training split's size: {e}; prepare the data first, or pass "
                              f"--max-epochs 0") from None
        epoch_tokens = None
    if max_epochs and epoch_tokens is None:
        raise ConfigError("--max-epochs needs the training split's size, which data.remote does not give before "
                          "its shards are downloaded; pass --max-epochs 0 to plan without it")
    per_step = base_cfg.data.micro_batch_size * base_cfg.data.grad_accumulation * base_cfg.data.seq_len
    sizes = sorted({shape_for_depth(d, aspect) for d in depths} | set(shapes), key=lambda s: (s[0] * s[1] ** 2, s))
    if not sizes:
        raise ConfigError("no model size: give --depths or --shapes")
    points, dropped = [], []
    for objective in objectives:
        for layers, hidden in sizes:
            cfg = load_config(base, [*overrides, f"objective={objective}", f"model.num_layers={layers}",
                                     f"model.hidden_size={hidden}", f"model.num_attention_heads={num_heads(hidden)}"])
            per_token = training_flops_per_token(cfg, vocab)
            ffn = cfg.model.ffn_hidden_size or 4 * hidden
            for budget in budgets:
                steps = round(budget / (per_token * per_step))
                epochs = steps * per_step / epoch_tokens if epoch_tokens else float("nan")
                where = f"{objective} L{layers} h{hidden} at C={budget:.2e}"
                if steps < min_steps:
                    dropped.append(f"{where}: {steps} steps < {min_steps}")
                elif max_epochs and epochs > max_epochs:
                    dropped.append(f"{where}: {epochs:.1f} epochs of the training split > {max_epochs:g}")
                else:
                    points.append(GridPoint(objective, budget, layers, hidden,
                                            non_embedding_params(layers, hidden, ffn), per_token, steps,
                                            steps * per_step, epochs))
    return points, dropped


def write_grid(points: list[GridPoint], base: str, out: Path, overrides: list[str] = ()) -> list[Path]:
    """One resolved config per point (<out>/configs/<name>.yaml, run_dir <out>/<name>) and <out>/plan.json; returns
    the config paths in grid order. Rewriting the same grid gives the same files, so a plan can be rerun."""
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    paths = []
    warmup = load_config(base, list(overrides)).optimizer.warmup_steps
    for point in points:
        cfg: RunConfig = load_config(base, [*overrides, *point.overrides(warmup), f"run_dir={out / point.name}",
                                            f"name={point.name}"])
        path = out / "configs" / f"{point.name}.yaml"
        atomic_write(path, to_yaml(cfg))  # a plan rerun beside running points: never a half-written config
        paths.append(path)
    plan = [{**asdict(p), "flops": p.flops, "name": p.name, "config": str(path)} for p, path in zip(points, paths)]
    atomic_write(out / "plan.json", json.dumps({"base": base, "overrides": list(overrides), "points": plan}, indent=1))
    return paths


def format_grid(points: list[GridPoint]) -> str:
    """A markdown table of the grid, with each point's FLOPs against its budget."""
    rows = ["| objective | budget C | layers x hidden | N (non-emb.) | FLOPs/token | steps | tokens D | epochs | "
            "FLOPs / C |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        rows.append(f"| {p.objective} | {p.budget:.2e} | {p.num_layers} x {p.hidden_size} | {p.params:,} | "
                    f"{p.flops_per_token:.3e} | {p.steps:,} | {p.tokens:,} | {p.epochs:.2f} | "
                    f"{p.flops / p.budget:.4f} |")
    return "\n".join(rows)
