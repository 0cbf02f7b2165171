"""The IsoFLOP planner (mdm_scale/scaling/plan.py): points on their budget, the FLOP formula per objective, one job-
array element per point, and the local queue that runs them resumably."""

from __future__ import annotations

import json

import pytest

from mdm_scale.config import ConfigError, load_config
from mdm_scale.flops import flops_per_token, non_embedding_params, training_flops_per_token
from mdm_scale.scaling.__main__ import main
from mdm_scale.scaling.plan import isoflop_grid, num_heads, parse_shape

BUDGETS = [3e12, 1e13, 3e13]


def test_every_point_spends_its_budget_within_one_percent():
    points, dropped = isoflop_grid("char_lm", BUDGETS, ["mdlm", "ar", "lomdm_paper"], [2, 3, 4, 5], max_epochs=0)
    assert len(points) >= 12 and dropped
    for p in points:
        assert abs(p.flops / p.budget - 1) < 0.01, p
        assert p.steps >= 100 and p.hidden_size == 64 * p.num_layers
    assert all("< 100" in line for line in dropped)
    # a dropped point is one whose budget buys fewer than min_steps steps, never a silently shortened run
    assert {(p.objective, p.num_layers, p.budget) for p in points}.isdisjoint(
        {(line.split()[0], int(line.split()[1][1:]), float(line.split("C=")[1].split(":")[0])) for line in dropped})


def test_explicit_shapes_join_the_depth_rule_by_size_and_stay_on_budget():
    points, _ = isoflop_grid("char_lm", [1e13], ["mdlm"], [1, 2],
                             shapes=[parse_shape("1x128"), (2, 128), parse_shape("1x32")], max_epochs=0)
    assert [(p.num_layers, p.hidden_size) for p in points] == [(1, 32), (1, 64), (1, 128), (2, 128)]  # by N, once
    assert [p.params for p in points] == sorted(p.params for p in points)
    assert all(abs(p.flops / p.budget - 1) < 0.01 for p in points)
    assert [num_heads(p.hidden_size) for p in points] == [1, 1, 2, 2]  # 1 x 32: one head of width 32
    for bad in ("1x100", "0x128", "128", "axb"):
        with pytest.raises(ConfigError, match="shape"):
            parse_shape(bad)
    with pytest.raises(ConfigError, match="no model size"):
        isoflop_grid("char_lm", [1e13], ["mdlm"], [], max_epochs=0)


def test_flops_per_token_counts_lomdm_papers_two_draws_clean_pass_and_scheduler_layers():
    """F = R F_row + F_clean + (1 + R) F_sched (mdm_scale/flops.py), by hand for 2 x 128, s = 256, V = 257."""
    L, h, f, s, V, m = 2, 128, 512, 256, 257, 96
    cfg = {o: load_config("char_lm", [f"objective={o}", f"model.num_layers={L}", f"model.hidden_size={h}",
                                      "model.num_attention_heads=2", f"model.scheduler_head_size={m}"])
           for o in ("mdlm", "lomdm", "lomdm_paper")}
    row = 6 * (L * (4 * h * h + 2 * h * f) + h * V) + 12 * L * h * s
    clean = 2 * L * (4 * h * h + 2 * h * f) + 4 * L * h * s
    mlp = 6 * (h * m + m)  # each scheduler's h -> m -> 1 MLP
    sched = 6 * (4 * h * h + 2 * h * f) + 12 * h * s + mlp
    assert training_flops_per_token(cfg["mdlm"], V) == row == flops_per_token(L, h, f, V, s, clean_pass=False)
    assert training_flops_per_token(cfg["lomdm"], V) == row + clean + 2 * mlp  # MLP heads only, one row
    assert training_flops_per_token(cfg["lomdm_paper"], V) == 2 * row + clean + 3 * sched
    assert non_embedding_params(L, h, f) == 12 * L * h * h


def test_slurm_dry_run_renders_one_array_element_per_grid_point(tmp_path, capsys):
    rc = main(["plan", "--budgets", *map(str, BUDGETS), "--depths", "2", "3", "4", "--out", str(tmp_path),
               "--max-epochs", "0", "--slurm", "--nodes 1 --gpus-per-node 0", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    plan = json.loads((tmp_path / "plan.json").read_text())["points"]
    assert f"#SBATCH --array=0-{len(plan) - 1}%" in out
    run_dirs = [line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("# run_dir ")]
    assert run_dirs == [str(tmp_path / p["name"]) for p in plan] and len(set(run_dirs)) == len(plan)
    for p in plan:  # each element's config is the point: its shape and its steps
        cfg = load_config(p["config"])
        assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.steps) == (
            p["num_layers"], p["hidden_size"], p["steps"])


def test_local_queue_runs_the_grid_and_a_rerun_skips_finished_runs(tmp_path, capsys):
    import subprocess
    import sys

    from mdm_scale.run_queue import ROOT
    from mdm_scale.scaling.collect import RunReadError, point_of

    args = ["plan", "--config", "tiny", "--objectives", "mdlm", "--budgets", "3e9", "--depths", "1",
            "--min-steps", "2", "--out", str(tmp_path), "--local", "data.tokenizer=byte", "logging.wandb=false",
            "sampling.num_samples=0", "train.eval_batches=1"]
    assert main([a for a in args if a != "--local"]) == 0  # the configs only
    (point,) = json.loads((tmp_path / "plan.json").read_text())["points"]
    # a point stopped short of its steps (a time limit, a session's end) is no scaling point yet...
    subprocess.run([sys.executable, str(ROOT / "launchers" / "local.py"), f"config={point['config']}",
                    "train.stop_at=2"], check=True, capture_output=True, cwd=ROOT)
    with pytest.raises(RunReadError, match="still training"):
        point_of(tmp_path / point["name"])
    assert main(args) == 0  # ...and the queue resumes it to the end
    log = tmp_path / f"{point['name']}.log"
    assert point["steps"] == 3 and (tmp_path / point["name"] / "checkpoints").is_dir()
    size = log.stat().st_size
    capsys.readouterr()
    assert main(args) == 0
    assert log.stat().st_size == size and "complete" in capsys.readouterr().out  # nothing ran again

    # `fit` reads the finished run back as the planned point (its own tokens and FLOPs), and says why one run
    # cannot give a law instead of printing one
    read = point_of(tmp_path / point["name"])
    assert (read.objective, read.tokens) == ("mdlm", point["tokens"]) and read.flops == pytest.approx(point["flops"])
    assert main(["fit", str(tmp_path / point["name"]), str(tmp_path / "configs"), "--out", str(tmp_path / "fit"),
                 "--bootstrap", "5"]) == 0
    captured = capsys.readouterr()
    assert "skipped:" in captured.err and "not a run directory" in captured.err
    report = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert "unavailable" in report["objectives"]["mdlm"]["parametric"]
    assert not report["objectives"]["mdlm"]["isoflop_minima"][0]["usable"]


def test_local_workers_run_the_points_side_by_side(tmp_path, capsys):
    """--workers 2: two queues share the grid, every point completes once."""
    args = ["plan", "--config", "tiny", "--objectives", "mdlm", "--budgets", "3e9", "4e9", "--depths", "1",
            "--min-steps", "2", "--out", str(tmp_path), "--local", "--workers", "2", "data.tokenizer=byte",
            "logging.wandb=false", "sampling.num_samples=0", "train.eval_batches=1"]
    assert main(args) == 0
    names = [p["name"] for p in json.loads((tmp_path / "plan.json").read_text())["points"]]
    assert len(names) == 2
    out = capsys.readouterr().out
    for name in names:
        assert out.count(f"{name}: complete") == 1 and (tmp_path / name / "checkpoints").is_dir()


def test_a_queue_passes_over_a_run_another_process_holds_and_takes_it_over_when_freed(tmp_path):
    """Queues in separate processes drain one grid: a run whose lock another owner holds is passed over (never
    launched), the next one trains, and the held run is trained once its lock is released unfinished."""
    import sys
    import threading
    import time

    from mdm_scale.run_queue import ROOT, is_complete, run_in_order
    from parallel.run_lock import RunLock

    assert main(["plan", "--config", "tiny", "--objectives", "mdlm", "--budgets", "3e9", "4e9", "--depths", "1",
                 "--min-steps", "2", "--out", str(tmp_path), "data.tokenizer=byte", "logging.wandb=false",
                 "sampling.num_samples=0", "train.eval_batches=1"]) == 0
    points = json.loads((tmp_path / "plan.json").read_text())["points"]
    runs = [(tmp_path / p["name"], [sys.executable, str(ROOT / "launchers" / "local.py"), f"config={p['config']}"],
             tmp_path / f"{p['name']}.log") for p in points]
    (held_dir, _, held_log), (free_dir, _, _) = runs
    lines, failed = [], []
    with RunLock(held_dir):  # "another process" trains the first point
        queue = threading.Thread(target=lambda: failed.append(run_in_order(runs, poll_s=0.2, report=lines.append)))
        queue.start()
        deadline = time.monotonic() + 300
        while not is_complete(free_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert is_complete(free_dir) and not held_log.exists()  # the free point trained, the held one never ran
    queue.join(timeout=300)  # the lock is gone with the run unfinished: the queue takes it over
    assert not queue.is_alive() and failed == [0] and is_complete(held_dir)
    assert lines == [f"{free_dir.name}: complete", f"{held_dir.name}: complete"]


def test_points_that_would_repeat_the_training_split_too_often_are_dropped():
    """--max-epochs: D over one epoch of the training split (its manifest's windows x seq_len); a point beyond the
    limit is dropped with its reason, the others keep their epochs."""
    from data_pipeline.datasets import embedded_corpus_shards
    from data_pipeline.shard_check import read_manifest
    from data_pipeline.tokenizer import load_tokenizer
    from pathlib import Path

    overrides = ["data.tokenizer=byte"]
    cfg = load_config("tiny", overrides)
    root = embedded_corpus_shards(cfg.data.source, load_tokenizer("byte"), cfg.data.seq_len,
                                  Path(cfg.data.cache_dir).expanduser())
    manifest = read_manifest(root / "train")
    epoch = manifest["num_samples"] * manifest["seq_len"]
    unlimited, _ = isoflop_grid("tiny", [1e11, 1e13], ["mdlm"], [1, 2], min_steps=1, max_epochs=0,
                                overrides=overrides)
    assert len(unlimited) == 4 and max(p.epochs for p in unlimited) > 1
    for p in unlimited:
        assert p.epochs == pytest.approx(p.tokens / epoch)
    limit = sorted(p.epochs for p in unlimited)[-2]  # keeps all but the most repeated point
    kept, dropped = isoflop_grid("tiny", [1e11, 1e13], ["mdlm"], [1, 2], min_steps=1, max_epochs=limit,
                                 overrides=overrides)
    assert len(kept) == 3 and all(p.epochs <= limit for p in kept)
    assert len(dropped) == 1 and "epochs of the training split" in dropped[0]


def test_max_epochs_without_the_data_is_one_clear_error(tmp_path, capsys):
    assert main(["plan", "--budgets", "1e13", "--out", str(tmp_path), "data.path=" + str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--max-epochs needs the training split's size" in err and "nowhere" in err


def test_a_grid_without_any_runnable_point_is_refused(tmp_path, capsys):
    assert main(["plan", "--budgets", "1e6", "--max-epochs", "0", "--out", str(tmp_path)]) == 2
    assert "no grid point has enough steps" in capsys.readouterr().err
