"""The synthetic order task's data generator and its exact likelihoods (issue 5, experiment 1).

Kept apart from the experiment driver (synthetic_order.py) so that the task definition (the tasks `chain2`, `key`,
`collapse`, described in synthetic_order.py's docstring) can be read and reused on its own.
"""

from __future__ import annotations

import math

import numpy as np

TASKS = ("collapse", "chain2", "key")
FIRST_SYMBOL = ord("a")  # byte ids of the V symbols: 'a', 'b', ...


def make_table(num_symbols: int, seed: int, task: str = "chain2") -> np.ndarray:
    """The generator's fixed random function. `collapse`: a 2-to-1 map f: [V] -> [V] ([V] array; V/2 image
    symbols with exactly two preimages each). `chain2`, `key`: a table g: [V] x [V] -> [V] ([V, V] array, i.i.d.
    uniform entries)."""
    _check_task(task)
    rng = np.random.default_rng(seed)
    if task == "collapse":
        if num_symbols % 2:
            raise ValueError("num_symbols must be even for a 2-to-1 map")
        image = rng.choice(num_symbols, size=num_symbols // 2, replace=False)
        return rng.permutation(np.repeat(image, 2)).astype(np.int64)
    return rng.integers(0, num_symbols, size=(num_symbols, num_symbols)).astype(np.int64)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def second_argument(seq_len: int, task: str) -> np.ndarray:
    """chain2 / key: c(i) for i = 0 .. L-3 (0-based), the index of g's second argument."""
    _check_task(task)
    i = np.arange(seq_len - 2)
    return i + 2 if task == "chain2" else np.full_like(i, seq_len - 1)


def source_probabilities(num_symbols: int, skew: float = 0.0) -> np.ndarray:
    """[V] law of the source tokens: p_j proportional to (j + 1)^-skew (0 = uniform, log V nats; skew 2 at V = 8:
    1.17 nats). A skewed source is cheap to generate first, so a greedy order finds right-to-left."""
    p = (np.arange(num_symbols) + 1.0) ** -float(skew)
    return p / p.sum()


def generate(num: int, seq_len: int, table: np.ndarray, *, noise: float, rng: np.random.Generator,
             task: str = "chain2", source_skew: float = 0.0) -> np.ndarray:
    """[num, seq_len] symbol indices in [0, V), each lookup replaced by a uniform symbol w.p. `noise`.
    collapse: x_1 a source, x_{i+1} = f(x_i). chain2 / key: the last two sources, x_i = g(x_{i+1}, x_{c(i)}).
    Sources are drawn from `source_probabilities(V, source_skew)` (uniform by default)."""
    v = len(table)
    x = np.empty((num, seq_len), dtype=np.int64)

    def sources(shape):  # rng.integers when uniform: the same draws as before the option existed
        if source_skew == 0:
            return rng.integers(0, v, size=shape)
        return rng.choice(v, size=shape, p=source_probabilities(v, source_skew))


    def resample(i):
        hit = rng.random(num) < noise
        x[hit, i] = rng.integers(0, v, size=int(hit.sum()))

    if task == "collapse":
        x[:, 0] = sources(num)
        for i in range(1, seq_len):
            x[:, i] = table[x[:, i - 1]]
            resample(i)
        return x
    c = second_argument(seq_len, task)
    x[:, -2:] = sources((num, 2))
    for i in range(seq_len - 3, -1, -1):
        x[:, i] = table[x[:, i + 1], x[:, c[i]]]
        resample(i)
    return x


def _sources(task: str) -> int:
    """Number of uniform (source) tokens per sequence."""
    _check_task(task)
    return 1 if task == "collapse" else 2


def true_nll_per_token(v: int, seq_len: int, noise: float, task: str = "chain2", source_skew: float = 0.0) -> float:
    """Exact entropy rate of the generator, nats per token: H(source law) per source token (log V if uniform),
    then H(noise mixture) per looked-up token. The NELBO an exact model reaches under any order."""
    p_hit = (1 - noise) + noise / v
    h_step = -(p_hit * math.log(p_hit)) - ((v - 1) * (noise / v) * math.log(noise / v) if noise > 0 else 0.0)
    p = source_probabilities(v, source_skew)
    h_source = float(-(p * np.log(p)).sum())
    k = _sources(task)
    return (k * h_source + (seq_len - k) * h_step) / seq_len


def exact_nll_per_token(x: np.ndarray, table: np.ndarray, noise: float, task: str = "chain2",
                        source_skew: float = 0.0) -> float:
    """Mean -log p(x) / L under the true generator for [n, L] symbol indices: the exact model's NELBO on exactly
    these sequences (the held-out split's own floor; it differs from the entropy rate by sampling noise)."""
    v, seq_len = len(table), x.shape[1]
    if task == "collapse":
        hit = x[:, 1:] == table[x[:, :-1]]
    else:
        hit = x[:, :-2] == table[x[:, 1:-1], x[:, second_argument(seq_len, task)]]
    p = np.where(hit, (1 - noise) + noise / v, noise / v)
    sources = x[:, :1] if task == "collapse" else x[:, -2:]
    log_source = np.log(source_probabilities(v, source_skew))[sources].sum(1)
    return float((-log_source - np.log(p).sum(1)).mean() / seq_len)
