"""The character-level benchmark's measurements: the unigram floor, the learning-speed interpolation, and a report
over real (tiny) runs of every kind it summarises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def char_lm(load_experiment):
    return load_experiment("char_lm")


@pytest.fixture(scope="module")
def report(load_experiment):
    return load_experiment("char_lm_report")


@pytest.fixture(scope="module")
def stats(load_experiment):
    return load_experiment("char_lm_verdicts")


def test_unigram_cross_entropy_is_log2_v_for_uniform_data_and_lower_for_skewed(char_lm):
    uniform = np.tile(np.arange(257), 40)
    assert char_lm.unigram_cross_entropy_bits(uniform, uniform) == pytest.approx(math.log2(257), abs=1e-12)
    skewed = np.concatenate([np.zeros(5000, dtype=int), np.arange(257)])
    assert char_lm.unigram_cross_entropy_bits(skewed, skewed) < 1.0


def test_queue_items_name_a_preset_or_a_variant(char_lm, tmp_path):
    """`lomdm_paper_fixed:0` is lomdm_paper with c2 = 0 (w = c1 = 0.7 everywhere: no learned order) in its own run
    directory; a preset name passes through unchanged."""
    from mdm_scale.config import load_config

    def config_of(command):
        return load_config("char_lm", command[command.index("config=char_lm") + 1:])

    fixed = config_of(char_lm.run_command("lomdm_paper_fixed", 0, tmp_path))
    paper = config_of(char_lm.run_command("lomdm_paper", 0, tmp_path))
    assert fixed.run_dir == str(tmp_path / "lomdm_paper_fixed-s0") and paper.run_dir == str(tmp_path / "lomdm_paper-s0")
    assert fixed.objective.schedule.exponent_range == 0 and paper.objective.schedule.exponent_range == 0.65
    assert fixed.objective.schedule.min_exponent == paper.objective.schedule.min_exponent == 0.7
    assert fixed.objective.score_baseline == paper.objective.score_baseline == "two_draw"


def test_tokens_to_reach_interpolates_between_evaluations(stats):
    curve = [(0, 5.0), (100, 4.0), (200, 3.0)]
    assert stats.tokens_to_reach(curve, 3.5) == pytest.approx(150.0)
    assert stats.tokens_to_reach(curve, 4.0) == pytest.approx(100.0)
    assert stats.tokens_to_reach(curve, 2.0) is None


def test_seed_mean_stderr_takes_the_larger_of_the_seed_spread_and_the_measurement_noise(stats):
    assert stats.seed_mean_stderr([3.0, 3.2], [0.01, 0.01]) == pytest.approx(np.std([3.0, 3.2], ddof=1) / math.sqrt(2))
    assert stats.seed_mean_stderr([3.0, 3.001], [0.1, 0.2]) == pytest.approx(math.sqrt(0.1**2 + 0.2**2) / 2)
    assert stats.seed_mean_stderr([3.0], [0.05]) == 0.05  # one seed: its measurement's error only
    assert math.isnan(stats.seed_mean_stderr([3.0, 3.2], [0.01, float("nan")]))


def test_verdicts_follow_the_two_standard_error_rule(stats):
    """Each claim is read off the numbers by its fixed rule: lower / higher / level by two standard errors of the
    difference (seed_mean_stderr on each side), every seed reaching MDLM's final value before MDLM's bytes, a
    positive Figure-4 correlation in every seed."""
    def row(values, stderr=0.01, fractions=None, generation=None):
        values = np.asarray(values, dtype=float)
        out = {"seeds": list(range(len(values))), "mean": float(values.mean()), "stderr": stderr,
               "stderr_of_mean": stats.seed_mean_stderr(values.tolist(), [stderr] * len(values))}
        if fractions is not None:
            out["fraction_of_mdlm_tokens_to_reach_its_final_order_form"] = fractions
        if generation is not None:
            out["generation_bits_per_byte"], out["generation_bits_stderr"] = {"64": generation[0]}, {"64": generation[1]}
        return out

    runs = [{"objective": "lomdm_paper", "confidence": {"spearman_velocity_vs_confidence": rho}} for rho in (0.5, 0.2)]
    mdlm = row([3.20, 3.22, 3.18], generation=(4.0, 0.05))  # seed-mean stderr 0.02 / sqrt(3)

    def verdicts(learned, runs):  # each row's difference from MDLM, as summarise leaves it
        return stats.verdicts(stats.against_mdlm({"mdlm": dict(mdlm), "lomdm_paper": learned}), runs)

    lower = verdicts(row([3.10, 3.12, 3.08], fractions=[0.6, 0.7, 0.8], generation=(3.8, 0.05)), runs)
    assert lower["perplexity"]["difference"] == pytest.approx(-0.10)
    assert lower["perplexity"]["stderr"] == pytest.approx(math.sqrt(2) * 0.02 / math.sqrt(3))
    assert lower["perplexity"]["verdict"] == "confirmed at this scale"
    assert lower["learning speed"]["verdict"] == "confirmed at this scale"
    assert lower["generation NFE 64"]["verdict"] == "confirmed at this scale"  # -0.2 > 2 x 0.071
    assert lower["learned order (Figure 4)"]["verdict"] == "confirmed at this scale"
    assert lower["zero-shot"]["verdict"] == "not measurable here"
    higher = verdicts(row([3.26, 3.25, 3.25], fractions=[None, 0.9, 1.2], generation=(4.1, 0.05)), runs[:1] + [
        {"objective": "lomdm_paper", "confidence": {"spearman_velocity_vs_confidence": -0.1}}])
    assert higher["perplexity"]["verdict"] == "not confirmed: higher"
    assert higher["learning speed"]["verdict"] == "not confirmed: 1 of 3 seeds never reach MDLM's final value"
    assert higher["generation NFE 64"]["verdict"] == "not confirmed: level within two standard errors"
    assert higher["learned order (Figure 4)"]["verdict"] == "not confirmed: not positive in every seed"
    level = verdicts(row([3.21], stderr=0.03, fractions=[1.1]), runs)
    assert level["perplexity"]["stderr"] == pytest.approx(math.hypot(0.02 / math.sqrt(3), 0.03))  # one seed
    assert level["perplexity"]["verdict"] == ("not confirmed: level within two standard errors (one seed on a side: "
                                              "the seed variance is unknown)")
    assert level["learning speed"]["verdict"] == "not confirmed: no faster than MDLM"
    assert "generation NFE 64" not in level
    nan = stats.verdicts(stats.against_mdlm({"mdlm": row([3.2], stderr=float("nan")), "lomdm_paper": row([3.0])}), runs)
    assert nan["perplexity"]["verdict"].startswith("not measurable: no standard error")
    # with the ablation (c2 = 0) in the table, what the learned order adds is read against it by the same rule
    assert not any(claim.startswith("learned order against") for claim in lower)
    learned = row([3.10, 3.12, 3.08], generation=(3.8, 0.05))
    ablated = stats.verdicts(stats.against_mdlm({"mdlm": dict(mdlm), "lomdm_paper": learned,
                                                 "lomdm_paper_fixed": row([3.11], stderr=0.02, generation=(4.0, 0.05))}),
                             runs)
    held_out = ablated["learned order against lomdm_paper_fixed (c2 = 0): held-out"]
    assert held_out["difference"] == pytest.approx(-0.01)
    assert held_out["stderr"] == pytest.approx(math.hypot(learned["stderr_of_mean"], 0.02))
    assert held_out["verdict"] == ("not confirmed: level within two standard errors (one seed on a side: the seed "
                                   "variance is unknown)")
    generation = ablated["learned order against lomdm_paper_fixed (c2 = 0): generation NFE 64"]
    assert generation["difference"] == pytest.approx(-0.2) and generation["verdict"].startswith("confirmed")


def test_report_covers_fixed_and_learned_orders(dims, report, tmp_path):
    from data_pipeline.preprocess import preprocess
    from mdm_scale.config import load_config
    from mdm_scale.metrics import read_metrics
    from mdm_scale.train import train

    data = tmp_path / "data"
    text = (ROOT / "tests/data/public_domain_sample.txt").read_text()
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):  # four documents: every 2nd held out
        (docs / f"{i}.txt").write_text(text[i * 20000:(i + 1) * 20000])
    preprocess([docs], data, tokenizer="byte", seq_len=32, heldout_every=2, overwrite=True)
    fast = ["data.tokenizer=byte", f"data.path={data}", "data.seq_len=32", "data.micro_batch_size=8",
            "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.scheduler_head_size=16",
            "logging.wandb=false", "logging.log_every=1", "logging.progress=false", "train.eval_batches=1",
            "train.eval_every=2", "sampling.num_samples=0", "train.steps=4", "optimizer.warmup_steps=1"]
    runs = tmp_path / "runs"
    for objective in ("mdlm", "ar", "lomdm_paper"):
        train(load_config("tiny", [*fast, f"objective={objective}", f"run_dir={runs / f'{objective}-s0'}"]))
    # a run still training (stopped at step 2 of 4): left out of the equal-tokens table, and said so
    train(load_config("tiny", [*fast, "objective=mdlm", "train.seed=1", "train.stop_at=2",
                               f"run_dir={runs / 'mdlm-s1'}"]))
    # the report's sample windows are spread over the whole held-out split (its start is one document)
    from data_pipeline.datasets import open_split
    from data_pipeline.tokenizer import load_tokenizer

    split = open_split(data, "heldout", load_tokenizer("byte"), seq_len=32, batch_size=1, seed=0, shuffle=False)
    n = split.num_samples
    spread = report.heldout_windows(load_config(runs / "mdlm-s0" / "config.yaml"), 5)
    ends = np.asarray(split.source.get(np.array([0, n - 1])))  # the split's first and last windows
    assert n > 100 and spread.shape == (5, 32) and np.array_equal(spread[[0, -1]].numpy(), ends)
    settings = dict(batches=1, time_samples=1, nfe=(4, 32), num_samples=2, exact_windows=2)
    result = report.report(runs, tmp_path / "out", **settings, jobs=2)  # one process per run, two at a time
    summary = result["summary"]
    assert set(summary) == {"mdlm", "ar", "lomdm_paper"} and summary["mdlm"]["seeds"] == [0]
    assert result["left_out_still_training"] == {"mdlm-s1": 2} and not (tmp_path / "out/runs/mdlm-s1.json").exists()
    assert all(math.isfinite(row["mean"]) and row["complete"] for row in summary.values())
    assert "exact_bits_per_byte" in summary["ar"] and summary["mdlm"]["minus_mdlm"]["difference"] == 0.0
    assert all(math.isfinite(v) for row in summary.values() for v in row["generation_bits_per_byte"].values())
    assert all(math.isfinite(v) and v > 0 for row in summary.values() for v in row["generation_bits_stderr"].values())
    # AR generates one position per call: scored at NFE >= L (32) only, the others at every NFE
    assert set(summary["ar"]["generation_bits_per_byte"]) == {"32"}
    assert set(summary["mdlm"]["generation_bits_per_byte"]) == set(summary["lomdm_paper"]["generation_bits_per_byte"])
    assert set(summary["mdlm"]["generation_bits_per_byte"]) == {"4", "32"}
    lomdm_run = next(r for r in result["runs"] if r["objective"] == "lomdm_paper")
    # the headline compares unbiased numbers: the learned schedule's order form, not its (optimistic) time form
    assert summary["lomdm_paper"]["estimator"] == "order form (t_min = 0)" and summary["mdlm"]["estimator"] == "own"
    assert summary["lomdm_paper"]["bits_per_byte"] == [lomdm_run["order_form_bits_per_byte"]]
    assert summary["lomdm_paper"]["own_estimator_bits_per_byte"] == [lomdm_run["bits_per_byte"]]
    assert summary["lomdm_paper"]["bits_per_byte"] != summary["lomdm_paper"]["own_estimator_bits_per_byte"]
    assert summary["lomdm_paper"]["minus_mdlm"]["difference"] == pytest.approx(
        lomdm_run["order_form_bits_per_byte"] - summary["mdlm"]["mean"])
    lomdm = next(r for r in result["runs"] if r["objective"] == "lomdm_paper")
    assert len(lomdm["order"]["mean_reveal_time"]) == 32 and lomdm["confidence"]["sequences"] > 0
    # learned schedules log the unbiased order form at every training evaluation too; fixed ones do not need it
    assert [t for t, _ in lomdm["curve_order_form"]] == [t for t, _ in lomdm["curve"]] and len(lomdm["curve"]) == 3
    assert [v for _, v in lomdm["curve_order_form"]] != [v for _, v in lomdm["curve"]]
    assert all("curve_order_form" not in r for r in result["runs"] if r["objective"] != "lomdm_paper")
    assert "fraction_of_mdlm_tokens_to_reach_its_final_order_form" in summary["lomdm_paper"]
    # a scaling point of a learned-schedule run takes the unbiased order form, a fixed schedule's its own NELBO
    from mdm_scale.scaling.collect import point_of

    assert point_of(runs / "lomdm_paper-s0").loss == pytest.approx(lomdm["curve_order_form"][-1][1] * math.log(2))
    mdlm = next(r for r in result["runs"] if r["objective"] == "mdlm")
    assert point_of(runs / "mdlm-s0").loss == pytest.approx(mdlm["curve"][-1][1] * math.log(2))
    table = report.progress_table(runs).splitlines()  # the between-sessions table, from the logs alone
    assert table[0] == "| run | 0 | 2 | 4 |" and len(table) == 6
    assert next(line for line in table if line.startswith("| mdlm-s1 (checkpoint at step 2) |"))
    row = next(line for line in table if line.startswith("| lomdm_paper-s0 (complete) |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert [c.count(" / ") for c in cells] == [1, 1, 1]  # time form / order form at every evaluation
    assert f"{lomdm['curve_order_form'][-1][1]:.3f}" in cells[-1]
    assert (tmp_path / "out" / "heldout_bits.png").exists() and (tmp_path / "out" / "learned_order.png").exists()
    # a second report reuses every cached run result (same checkpoints and settings): nothing is evaluated again
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*.json")}
    again = report.report(runs, tmp_path / "out", **settings)["summary"]
    assert len(cached) == 3 and json.dumps(again) == json.dumps(summary)  # (json: a 1-batch stderr is NaN)
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
    tables = (tmp_path / "out" / "tables.md").read_text().splitlines()  # the markdown docs/results.md holds
    assert tables[-1] == "Left out, still training: mdlm-s1 (step 2)."
    verdict_rows = {line.split(" | ")[0][2:]: line for line in tables if line.endswith(" |") and
                    line.split(" | ")[0][2:] in result["verdicts"]}
    assert set(verdict_rows) == set(result["verdicts"]) >= {"perplexity", "learning speed", "generation NFE 4",
                                                            "generation NFE 32", "learned order (Figure 4)"}
    assert result["verdicts"]["perplexity"]["verdict"] in verdict_rows["perplexity"]
    assert "fraction_of_mdlm_tokens_to_reach_its_final" in summary["mdlm"]  # MDLM's own row: said to be the null
    assert sum(line.startswith("MDLM's own row") for line in tables) == 1
    row = next(line for line in tables if line.startswith("| lomdm_paper |"))
    assert f"| {summary['lomdm_paper']['mean']:.3f} (order form (t_min = 0)) |" in row
    minus = summary["lomdm_paper"]["minus_mdlm"]
    assert f"| {minus['difference']:+.3f} +- {minus['stderr']:.3f} |" in row
    generation = summary["lomdm_paper"]
    assert (f"| {generation['generation_bits_per_byte']['32']:.3f} +- {generation['generation_bits_stderr']['32']:.3f} |"
            in row)
    norms = lomdm["gradient_norms"]  # stability: the logged gradient norms, the schedule's part for LoMDM only
    assert norms["logged_steps"] == 4 and norms["max_grad_norm"] >= norms["max_grad_norm_schedule"] > 0
    assert "max_grad_norm_schedule" not in mdlm["gradient_norms"] and mdlm["gradient_norms"]["max_grad_norm"] > 0
    logged = [r for r in read_metrics(runs / "lomdm_paper-s0") if "train/grad_norm" in r]  # global^2 = parts^2
    assert norms["max_grad_norm_denoiser"] == pytest.approx(
        max(math.sqrt(r["train/grad_norm"] ** 2 - r["train/grad_norm_schedule"] ** 2) for r in logged))
    after = [r["train/grad_norm_schedule"] for r in logged if r["step"] > 1]  # optimizer.warmup_steps=1
    assert norms["median_grad_norm_schedule_after_warmup"] == pytest.approx(float(np.median(after)))
    stability = next(line for line in tables if line.startswith("| lomdm_paper s0 | 4 |"))
    assert f"{norms['max_grad_norm_schedule_after_warmup']:.2f} ({np.median(after):.2f}) |" in stability
    order_row = next(line for line in tables if line.startswith("| lomdm_paper s0 |"))
    assert f"{lomdm['confidence']['spearman_velocity_vs_confidence']:+.3f} |" in order_row
