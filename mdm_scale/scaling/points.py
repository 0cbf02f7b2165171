"""The data every scaling fit reads: one `Point` per finished run, and the rule that laws are fitted per objective.

A point is N non-embedding parameters, D training tokens, C training FLOPs and the run's held-out NELBO L in
nats/token. Nothing assumes C = 6 N D (the frontier takes the FLOPs-per-token function f(N) separately,
frontier.py), and every value must be positive and finite because every fit works in log space.

`fit --out` writes the points it read as points.json beside fit.json, and `fit --points` reads such files back: a
law can be refitted (or grids from several clusters pooled) after the run directories, checkpoints and all, are gone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass
class Point:
    """One finished run. params: non-embedding N; tokens: D; flops: C; loss: held-out NELBO (nats/token)."""

    objective: str
    params: float
    tokens: float
    flops: float
    loss: float
    run_dir: str = ""

    def __post_init__(self):
        for name in ("params", "tokens", "flops", "loss"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):  # every fit works in log space
                raise ValueError(f"Point {self.run_dir or self.objective}: {name}={value} must be positive and finite")
            setattr(self, name, value)


def by_objective(points: Sequence[Point]) -> dict[str, list[Point]]:
    """{objective: its points}, objectives sorted: every law is fitted per objective, never across them."""
    groups: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        groups[p.objective].append(p)
    return {k: groups[k] for k in sorted(groups)}


def write_points(points: Sequence[Point], path: Path) -> None:
    Path(path).write_text(json.dumps([dataclasses.asdict(p) for p in points], indent=1))


def read_points(path: Path) -> list[Point]:
    """The points of a points.json, each checked as it is built; a file that is not one is a ValueError naming it."""
    try:
        rows = json.loads(Path(path).read_text())
        return [Point(**row) for row in rows]
    except (OSError, ValueError, TypeError) as e:  # unreadable, not JSON, missing or unknown fields, bad values
        raise ValueError(f"{path}: not a points.json written by `fit --out` ({type(e).__name__}: {e})") from e
