"""The steps study (experiments/steps): the Markov source's exact likelihood against brute-force enumeration, its
entropy rate, the correctness checker, the exact denoiser against enumeration, and the --quick pipeline end to end."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

STEPS = Path(__file__).resolve().parents[2] / "experiments" / "steps"
sys.path.insert(0, str(STEPS))

import source  # noqa: E402


@pytest.fixture(scope="module")
def src():
    return source.make_source(num_symbols=5, allowed=2, seed=3)


def all_sequences(v, length):
    return np.array(list(itertools.product(range(v), repeat=length)), dtype=np.int64)


def test_likelihood_sums_to_one_and_matches_enumeration(src):
    x = all_sequences(5, 4)
    logp = src.log_likelihood(x)
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-12)
    # the product of transition probabilities, written out by hand
    for row, lp in zip(x[::37], logp[::37]):
        p = src.pi[row[0]] * np.prod([src.P[a, b] for a, b in zip(row[:-1], row[1:])])
        assert np.exp(lp) == pytest.approx(p, abs=1e-15)
    # exact expected NLL per token = (H(pi) + (L - 1) H) / L
    finite = np.isfinite(logp)
    entropy = -(np.exp(logp[finite]) * logp[finite]).sum() / 4
    assert entropy == pytest.approx(src.expected_nll_per_token(4), abs=1e-12)
    assert np.allclose(src.pi @ src.P, src.pi)  # stationary start


def test_correctness_checker(src):
    x = all_sequences(5, 4)
    logp = src.log_likelihood(x)
    assert (src.is_correct(x) == np.isfinite(logp)).all()  # correct iff in the support
    assert (~src.is_correct(x)).any()
    samples = src.sample(2000, 20, np.random.default_rng(0))
    assert src.is_correct(samples).all()
    forbidden = np.argwhere(src.P == 0)[0]
    bad = samples[:3].copy()
    bad[0, 7:9] = forbidden
    bad[1, 0] = 9  # outside the alphabet
    assert src.is_correct(bad).tolist() == [False, False, bool(src.is_correct(bad[2:3])[0])]
    err = src.token_errors(bad)
    assert err[0, 8] and err[1, 0] and err[1, 1]
    m = src.metrics(samples)
    assert m["seq_error"] == 0 and m["token_error"] == 0 and abs(m["nll_gap"]) < 0.05
    # floor-charged NLL: one forbidden transition costs -log(FLOOR) instead of its (infinite) true value
    charged = src.true_nll_per_token(bad[:1])[0] * 20
    row = bad[0]
    steps = [src.pi[row[0]]] + [src.P[a, b] for a, b in zip(row[:-1], row[1:])]
    expected = -sum(np.log(q) if q > 0 else np.log(source.FLOOR) for q in steps)
    assert err[0].sum() == sum(q == 0 for q in steps) >= 1
    assert charged == pytest.approx(expected, abs=1e-9)


def test_oracle_denoiser_is_the_exact_conditional(src):
    import torch

    oracle = source.OracleDenoiser(src, vocab_size=12, offset=2, max_seq_len=8)
    x = all_sequences(5, 5)
    p = np.exp(src.log_likelihood(x))
    seen = src.sample(1, 5, np.random.default_rng(1))[0]
    z = torch.tensor([[12, seen[1] + 2, 12, 12, seen[4] + 2]])  # masked, x_1, masked, masked, x_4
    logp = oracle(z)
    assert logp.shape == (1, 5, 12)
    match = (x[:, 1] == seen[1]) & (x[:, 4] == seen[4])
    for i in (0, 2, 3):
        brute = np.array([p[match & (x[:, i] == v)].sum() for v in range(5)])
        brute /= brute.sum()
        assert np.allclose(logp[0, i, 2:7].exp().numpy(), brute, atol=1e-10)
        assert torch.isinf(logp[0, i, :2]).all() and torch.isinf(logp[0, i, 7:]).all()


def test_quick_pipeline(tmp_path):
    import step_study

    report = step_study.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["models"] == ["oracle", "trained"]
    rows = saved["rows"]
    assert {r["sampler"] for r in rows} == {"ancestral", "confidence", "eb", "beta"}
    assert all(0 <= r["seq_error"] <= 1 and np.isfinite(r["nll"]) for r in rows)
    # the exact denoiser with one position per step (confidence at NFE = L) samples the source exactly
    exact = [r for r in rows if r["model"] == "oracle" and r["sampler"] == "confidence" and r["nfe"] == r["seq_len"]]
    assert exact and all(r["seq_error"] == 0 for r in exact)
    assert saved["equal_quality"]["oracle"] and saved["beta"]["oracle"]
    assert all(Path(f).exists() for f in report["plots"]) and len(report["plots"]) == 4
