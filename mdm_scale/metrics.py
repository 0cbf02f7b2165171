"""Progress bar (tqdm: tokens/s, loss, ETA), metric lines and wandb (offline by default), on the main rank only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mdm_scale.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
"""Under the run directory: every logged step as one JSON object, appended across resumes (main rank only)."""


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows MetricsLogger wrote to <run_dir>/metrics.jsonl, in order; [] before the first step is logged."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class MetricsLogger:
    """Args:
    cfg: logging section of the run config.
    run_dir: wandb writes its offline run under here.
    total_steps / start_step: for the progress bar and ETA.
    enabled: False on non-main ranks (nothing is printed or logged there).

    Every logged metric also goes to <run_dir>/metrics.jsonl (one JSON object per step, appended across resumes).
    """

    def __init__(self, cfg: LoggingConfig, *, run_dir: str, run_name: str, config: dict, total_steps: int,
                 start_step: int, enabled: bool = True):
        self.cfg, self.enabled = cfg, enabled
        self.wandb_run = None
        if enabled and cfg.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.wandb_project, name=run_name, mode=cfg.wandb_mode, dir=run_dir, config=config,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
        self.bar = (
            tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step", dynamic_ncols=True,
                 mininterval=1.0)
            if enabled and cfg.progress else None
        )
        self._last_time, self._tokens = time.perf_counter(), 0
        self._jsonl = open(Path(run_dir) / METRICS_FILE, "a") if enabled else None

    def step(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        """Record one optimizer step that consumed `tokens` tokens (across all ranks)."""
        if not self.enabled:
            return
        self._tokens += tokens
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.log_every and step != 1:
            return
        now = time.perf_counter()
        tokens_per_s = self._tokens / max(now - self._last_time, 1e-9)
        self._last_time, self._tokens = now, 0
        metrics = {**metrics, "tokens_per_s": tokens_per_s}
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.write(f"step {step:>6} " + " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
        self.log(step, {f"train/{k}": v for k, v in metrics.items()})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
