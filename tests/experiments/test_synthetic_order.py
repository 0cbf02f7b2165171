"""The synthetic-order experiment: its data generator has the promised structure (x_i a table lookup of tokens to
its right, the last two uniform), the exact floors are right, and the --quick pipeline runs end to end (learned
and fixed objectives trained, finite held-out NELBOs, learned orders read back, report and plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def so(load_experiment):
    return load_experiment("synthetic_order")


@pytest.mark.parametrize("task", ["chain2", "key"])
def test_sequences_are_lookups_of_their_right_context(so, task):
    g = so.make_table(8, seed=3, task=task)
    assert g.shape == (8, 8) and g.min() >= 0 and g.max() < 8
    x = so.generate(2000, 10, g, noise=0.0, rng=np.random.default_rng(0), task=task)
    assert x.shape == (2000, 10) and x.min() >= 0 and x.max() < 8
    second = np.arange(2, 10) if task == "chain2" else np.full(8, 9)
    assert (x[:, :-2] == g[x[:, 1:-1], x[:, second]]).all()  # x_i = g(x_{i+1}, x_c(i)) everywhere
    # The last two tokens are independent and uniform over the alphabet.
    pairs = np.bincount(x[:, -2] * 8 + x[:, -1], minlength=64)
    assert pairs.min() > 10 and abs(pairs.mean() - 2000 / 64) < 1e-9
    # No lookup from the left determines the next token (the table is not invertible in its first argument).
    left = {}
    for row in x:
        for i in range(8):
            left.setdefault((row[i], row[i + 1]), set()).add(row[i + 2])
    assert max(len(v) for v in left.values()) > 1
    noisy = so.generate(4000, 10, g, noise=0.2, rng=np.random.default_rng(1), task=task)
    hit = (noisy[:, :-2] == g[noisy[:, 1:-1], noisy[:, second]]).mean()
    assert abs(hit - (0.8 + 0.2 / 8)) < 0.01  # resampled w.p. 0.2 (and lands on the lookup w.p. 1/V)


def test_collapse_task_follows_a_two_to_one_map_from_the_left(so):
    f = so.make_table(16, seed=3, task="collapse")
    counts = np.bincount(f, minlength=16)
    assert f.shape == (16,) and sorted(set(counts.tolist())) == [0, 2] and (counts == 2).sum() == 8
    x = so.generate(500, 12, f, noise=0.0, rng=np.random.default_rng(0), task="collapse")
    assert (x[:, 1:] == f[x[:, :-1]]).all()  # x_{i+1} = f(x_i): a lookup from the right end backwards is not
    assert len(np.unique(x[:, 0])) == 16  # the first token is uniform over the alphabet
    assert len(np.unique(x[:, -1])) < 8  # ... and the right end has collapsed onto f's cycles (low entropy)
    noisy = so.generate(4000, 12, f, noise=0.2, rng=np.random.default_rng(1), task="collapse")
    assert abs((noisy[:, 1:] == f[noisy[:, :-1]]).mean() - (0.8 + 0.2 / 16)) < 0.01


@pytest.mark.parametrize("task", ["collapse", "chain2", "key"])
def test_floors(so, task):
    g = so.make_table(16, seed=0, task=task)
    sources = 1 if task == "collapse" else 2
    assert so.true_nll_per_token(16, 8, 0.0, task) == pytest.approx(sources * math.log(16) / 8)
    assert so.true_nll_per_token(16, 8, 0.1, task) > so.true_nll_per_token(16, 8, 0.0, task)
    x = so.generate(20000, 8, g, noise=0.1, rng=np.random.default_rng(2), task=task)
    assert so.exact_nll_per_token(x, g, 0.1, task) == pytest.approx(so.true_nll_per_token(16, 8, 0.1, task),
                                                                     abs=0.01)
    clean = so.generate(100, 8, g, noise=0.0, rng=np.random.default_rng(3), task=task)
    assert so.exact_nll_per_token(clean, g, 0.0, task) == pytest.approx(sources * math.log(16) / 8)


@pytest.mark.parametrize("task", ["collapse", "chain2"])
def test_skewed_sources_follow_their_law_and_set_the_floor(so, task):
    """--source-skew a: sources drawn with p_j ~ (j+1)^-a; the entropy rate and the exact NLL use that law."""
    p = so.source_probabilities(8, 2.0)
    assert p.sum() == pytest.approx(1.0) and (np.diff(p) < 0).all()
    assert so.source_probabilities(8, 0.0) == pytest.approx(np.full(8, 1 / 8))
    g = so.make_table(8, seed=0, task=task)
    x = so.generate(40000, 8, g, noise=0.05, rng=np.random.default_rng(4), task=task, source_skew=2.0)
    sources = x[:, :1] if task == "collapse" else x[:, -2:]
    assert np.bincount(sources.ravel(), minlength=8) / sources.size == pytest.approx(p, abs=0.01)
    rate = so.true_nll_per_token(8, 8, 0.05, task, source_skew=2.0)
    assert rate < so.true_nll_per_token(8, 8, 0.05, task)  # lower-entropy sources
    assert so.exact_nll_per_token(x, g, 0.05, task, source_skew=2.0) == pytest.approx(rate, abs=0.01)
    # Uniform sources keep the draws of the generator before the option existed.
    before = so.generate(50, 8, g, noise=0.05, rng=np.random.default_rng(5), task=task)
    assert (so.generate(50, 8, g, noise=0.05, rng=np.random.default_rng(5), task=task, source_skew=0.0)
            == before).all()


def test_objective_specs(so):
    s = so.Settings()
    assert so.objective_overrides("right_to_left", s) == ["objective=ar", "objective.causal=false",
                                                          "objective.schedule.kind=right_to_left"]
    assert so.objective_overrides("ar", s) == ["objective=ar", "objective.causal=false"]  # same denoiser as the rest
    assert "objective.score_baseline=time_binned" in so.objective_overrides("mdm_ls:time_binned", s)
    assert so.objective_overrides("fixed:2.0.1", s)[-1] == "objective.schedule.order=[2,0,1]"
    assert "objective.estimator=order" in so.objective_overrides("mdlm_order", s)
    assert so.modal_order([0.5, 3.0, 1.0]) == [1, 2, 0]
    for bad in ("mdlm:rloo", "mdm_ls:nope", "nope", "fixed:0.0.1", "fixed:"):
        with pytest.raises(ValueError):
            so.parse_objective(bad)


def test_quick_pipeline_reports_finite_nelbos_and_learned_orders(so, tmp_path):
    report = so.main(["--quick", "--seeds", "0", "1", "--objectives", "mdlm", "mdm_ls", "lomdm:time_binned",
                      "--references", "--retrain-learned-order", "--out", str(tmp_path / "out")])
    objectives = ["mdlm", "mdm_ls", "lomdm:time_binned", "right_to_left", "ar", "mdm_ls/retrained"]
    assert report["objectives"] == objectives
    assert len(report["records"]) == 12
    for r in report["records"]:
        if r["objective"] == "mdm_ls/retrained":  # a fixed-order denoiser on that seed's modal learned order
            learned = next(x for x in report["records"] if x["objective"] == "mdm_ls" and x["seed"] == r["seed"])
            assert r["order"] == [i + 1 for i in so.modal_order(learned["exponents"])]
            assert r["spec"] == "fixed:" + ".".join(str(i - 1) for i in r["order"])
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["summary"].keys() == report["summary"].keys() == set(objectives)
    assert on_disk["machine_start"]["cpu_count"] >= 1 and on_disk["wall_s"] > 0
    seq_len = report["settings"]["seq_len"]
    for r in report["records"]:
        assert math.isfinite(r["final_nelbo"]) and 0 < r["final_nelbo"] < 20
        assert len(r["curve"]) >= 2 and r["curve"][-1][1] == r["final_nelbo"]
        if r["objective"] in ("mdlm", "right_to_left", "ar", "mdm_ls/retrained"):
            assert "exponents" not in r
        else:  # the presets' log family: |log w| <= 12
            w = np.array(r["exponents"])
            assert w.shape == (seq_len,) and np.all((w > 0) & (np.abs(np.log(w)) <= 12 + 1e-6))
            assert -1 <= r["spearman_position_w"] <= 1 and 0 <= r["p_right_neighbour_first"] <= 1
            assert len(r["mean_generation_step"]) == seq_len
    assert np.array(next(r for r in report["records"] if r["objective"] == "lomdm:time_binned")
                    ["exponents_per_sample_head"]).shape[1] == seq_len
    for obj in ("mdm_ls", "lomdm:time_binned", "right_to_left"):
        e = report["summary"][obj]
        assert e["margin_below_mdlm"] == pytest.approx(report["summary"]["mdlm"]["mean"] - e["mean"])
        assert isinstance(e["beats_mdlm_beyond_noise"], bool) and len(e["paired_differences"]) == 2
    assert "margin_below_right_to_left" in report["summary"]["mdm_ls"]
    assert report["data"]["heldout_exact_nll_per_token"] > 0
    assert "| mdlm |" in report["table"] and "| lomdm:time_binned |" in report["table"]
    names = {Path(p).name for p in report["plots"]}
    assert names == {"synthetic_order_learned_order.png", "synthetic_order_nelbo.png",
                     "synthetic_order_heatmap_mdm_ls.png", "synthetic_order_heatmap_lomdm-time_binned.png"}
    for p in report["plots"]:
        assert Path(p).stat().st_size > 1000


def test_exact_nelbo_matches_the_monte_carlo_estimator(so, tmp_path):
    """The experiment's exact held-out NELBO (pattern enumeration + Prop. 3.1) equals the library's
    own unbiased estimator averaged over many t and mask draws, for each kind of schedule it handles; shuffled
    sequences over other symbols give a value outside the Monte-Carlo interval, so the check can fail."""
    import torch

    from common import load_trained, run_config
    from mdm_scale.objective import nelbo
    from mdm_scale.time_sampling import TimeSampler

    out = tmp_path / "out"
    so.main(["--quick", "--seeds", "0", "--objectives", "mdlm", "mdm_ls", "lomdm", "right_to_left",
             "--out", str(out)])
    s = so.Settings.quick()
    g = so.make_table(s.num_symbols, s.data_seed, s.task)
    x = so.generate(6, s.seq_len, g, noise=s.noise, rng=np.random.default_rng(11), task=s.task) + so.FIRST_SYMBOL
    for spec in ("mdlm", "mdm_ls", "lomdm", "right_to_left"):
        cfg = run_config(so.objective_overrides(spec, s), data_dir=out / "data", run_dir=out / "runs" / f"{spec}-s0",
                         name="check", seed=0, s=s)
        exact = so.exact_heldout_nelbo(cfg, out / "runs" / f"{spec}-s0" / "checkpoints", x)
        denoiser, schedule = load_trained(cfg, out / "runs" / f"{spec}-s0" / "checkpoints")
        draws, gen = 12000, torch.Generator().manual_seed(0)
        x0 = torch.as_tensor(x).repeat(draws, 1)
        t, t_weight = TimeSampler.from_config(cfg.objective, evaluation=True).draw(len(x0), gen)
        if spec == "mdlm":  # the exact value has t_min = 0; MDLM's eval truncates at 1e-3 (bias ~1e-3 x NLL)
            t, t_weight = TimeSampler("uniform", t_min=0.0, power=0.2).draw(len(x0), gen)
        uniforms = torch.rand(x0.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            per_row = nelbo(denoiser, schedule, x0, t, t_weight, uniforms, score_function=False,
                            estimator=cfg.objective.estimator).per_sequence  # the learned presets: order form
        per_token = per_row.double() / s.seq_len
        mean, se = per_token.mean().item(), per_token.std().item() / math.sqrt(len(per_token))
        assert abs(mean - exact) < 4 * se + 1e-4, (spec, mean, se, exact)
        other = so.FIRST_SYMBOL + (x - so.FIRST_SYMBOL + 3) % s.num_symbols  # other symbols, same structure
        assert abs(so.exact_heldout_nelbo(cfg, out / "runs" / f"{spec}-s0" / "checkpoints", other) - exact) > 4 * se
