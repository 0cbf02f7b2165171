"""End-to-end training on CPU: every objective trains, the loss falls, and resume equals an uninterrupted run."""

from __future__ import annotations

import pytest

from mdm_scale.config import load_config
from mdm_scale.train import train

FAST = [
    "data.source=committed", "data.tokenizer=byte", "data.seq_len=32", "data.micro_batch_size=8",
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.scheduler_head_size=16",
    "logging.wandb=false", "logging.progress=false", "train.eval_batches=2", "train.eval_every=0",
    "sampling.num_samples=1", "sampling.nfe=4", "sampling.seq_len=16",
]


def _cfg(tmp_path, name, *extra):
    return load_config("tiny", [*FAST, f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", *extra])


@pytest.mark.parametrize("objective", ["mdlm", "ar", "block", "mdm_ls", "lomdm", "lomdm_paper"])
def test_every_objective_trains_tiny(dims, tmp_path, objective):
    result = train(_cfg(tmp_path, objective, f"objective={objective}", "train.steps=4", "objective.schedule.block_size=8"
                        if objective == "block" else "train.seed=0"))
    assert len(result.losses) == 4 and all(v == v and v < 1e4 for v in result.losses.values())
    assert result.checkpoint.endswith("step_00000004") and len(result.samples) == 1


@pytest.mark.parametrize("objective", ["mdm_ls", "lomdm", "mdlm"])
def test_schedule_parameters_train_at_their_own_learning_rate(dims, tmp_path, objective):
    """optimizer.schedule_lr_mult: the learned schedule's parameters (MDM-LS logits, LoMDM scheduler heads) form
    the second AdamW group at 10x lr through warm-up and cosine; MDLM has none, so one group."""
    from mdm_scale.schedules import is_schedule_parameter
    from mdm_scale.model import build_model
    from mdm_scale.train import build_training_engine

    cfg = _cfg(tmp_path, objective, f"objective={objective}", "optimizer.schedule_lr_mult=10", "train.steps=10",
               "optimizer.warmup_steps=2")
    model = build_model(cfg, 257, dims)
    engine = build_training_engine(model, cfg, dims)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = engine.optimizer.param_groups
    kinds = [{is_schedule_parameter(name[id(p)]) for p in g["params"]} for g in groups]
    assert kinds == ([{False}] if objective == "mdlm" else [{False}, {True}])
    assert sum(len(g["params"]) for g in groups) == len(name)
    for step in range(1, 6):
        engine.optimizer.step()  # no gradients: nothing moves, but LambdaLR wants a step before its own
        engine.lr_schedule.step()
        if len(groups) == 2:
            assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"]) and groups[0]["lr"] > 0, step


def test_eval_nelbo_falls_by_30_percent(dims, tmp_path):
    result = train(_cfg(tmp_path, "fall", "train.steps=80", "train.eval_every=40", "model.hidden_size=64",
                        "optimizer.lr=3e-3", "optimizer.warmup_steps=10", "data.micro_batch_size=16"))
    first, last = result.evals[0], result.evals[80]
    assert last < 0.7 * first, result.evals


# P-POTS with 2 bins: the proposal leaves uniform after the first step, so the resumed run must restore it.
P_POTS = ["objective=mdm_ls", "objective.t_sampler=p_pots", "objective.p_pots_bins=2", "objective.mask_pairs=mirror",
          "objective.score_baseline=time_binned"]


@pytest.mark.parametrize("objective", [["objective=mdlm"], ["objective=lomdm"], P_POTS],
                         ids=["mdlm", "lomdm", "mdm_ls-p_pots-mirror"])
def test_resume_equals_uninterrupted_run(dims, tmp_path, objective):
    common = [*objective, "train.steps=6", "model.dropout=0.1", "data.grad_accumulation=2"]
    full = train(_cfg(tmp_path, "full", *common))
    first = train(_cfg(tmp_path, "split", *common, "train.stop_at=3"))
    assert sorted(first.losses) == [1, 2, 3] and first.checkpoint.endswith("step_00000003")
    resumed = train(_cfg(tmp_path, "split", *common))
    assert sorted(resumed.losses) == [4, 5, 6]
    assert [resumed.losses[s] for s in (4, 5, 6)] == [full.losses[s] for s in (4, 5, 6)]
    if objective is P_POTS:  # the checkpointed proposal is not the uniform one (the check above can fail)
        from parallel.checkpoint import load_checkpoint
        from parallel.engine import safe_checkpoint_globals

        state = load_checkpoint(first.checkpoint, "tp0-pp0-dp0", safe_globals=safe_checkpoint_globals()).trainer
        square = state["time_sampler"]["square_sum"] / state["time_sampler"]["count"]
        assert (state["time_sampler"]["count"] > 0).all() and abs(square[0] / square[1] - 1) > 0.05


def test_wandb_logs_offline_into_the_run_directory(dims, tmp_path):
    train(_cfg(tmp_path, "wandb", "train.steps=2", "logging.wandb=true", "logging.log_every=1"))
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_trains_from_user_shards_in_data_path(dims, tmp_path):
    import numpy as np

    from data_pipeline.shard_writer import write_webdataset
    from data_pipeline.tokenizer import load_tokenizer

    rows = np.random.default_rng(0).integers(0, 256, size=(64, 32), dtype=np.uint32)
    for split in ("train", "heldout"):
        write_webdataset(rows, tmp_path / "data" / split, tokenizer_fingerprint=load_tokenizer("byte").fingerprint())
    result = train(_cfg(tmp_path, "user", "train.steps=2", f"data.path={tmp_path / 'data'}"))
    assert sorted(result.losses) == [1, 2]


def _preprocessed(tmp_path, pack: str):
    """The committed public-domain sample as 300 short documents (sentences of 8-30 characters, so `documents`
    packing puts several in each 32-byte window), preprocessed with `pack`."""
    import re
    from pathlib import Path

    from data_pipeline.preprocess import preprocess

    text = (Path(__file__).parents[1] / "data" / "public_domain_sample.txt").read_text()
    paragraphs = [p.strip() for p in re.split(r"[.;:!?]\s+", text) if 8 <= len(p.strip()) <= 30][:300]
    assert len(paragraphs) == 300
    docs = tmp_path / f"docs-{pack}"
    docs.mkdir()
    for i, p in enumerate(paragraphs):
        (docs / f"{i:03d}.txt").write_text(p)
    out = tmp_path / f"data-{pack}"
    preprocess([docs], out, tokenizer="byte", seq_len=32, pack=pack, heldout_every=5, progress=False)
    return out


def test_document_packed_shards_train_with_document_masks(dims, tmp_path):
    import shutil

    data = _preprocessed(tmp_path, "documents")
    assert (data / "train_documents").is_dir()
    with_ids = train(_cfg(tmp_path, "docs", "train.steps=3", f"data.path={data}"))
    for split in ("train", "heldout"):  # the same tokens without their document ids: one sequence per row
        shutil.rmtree(data / f"{split}_documents")
    without = train(_cfg(tmp_path, "nodocs", "train.steps=3", f"data.path={data}"))
    assert sorted(with_ids.losses) == [1, 2, 3] and all(v < 1e4 for v in with_ids.losses.values())
    assert with_ids.losses[1] != without.losses[1] and with_ids.evals[0] != without.evals[0]


def test_remote_data_trains_exactly_like_the_same_shards_on_disk(dims, tmp_path):
    data = _preprocessed(tmp_path, "wrap")
    on_disk = train(_cfg(tmp_path, "disk", "train.steps=3", f"data.path={data}"))
    remote = train(_cfg(tmp_path, "remote", "train.steps=3", f"data.remote={data}"))
    assert remote.losses == on_disk.losses and remote.evals == on_disk.evals
    assert list((tmp_path / "cache").glob("remote-*/train/*.mds"))  # streamed into the cache


def test_sigusr1_stops_after_the_step_with_a_checkpoint_and_the_rerun_continues_exactly(dims, tmp_path):
    import os
    import signal

    from mdm_scale.preemption import StopRequest

    full = train(_cfg(tmp_path, "full", "train.steps=4"))
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, as SLURM sends it before the time limit
        assert stop.signum == signal.SIGUSR1
        first = train(_cfg(tmp_path, "split", "train.steps=4"), stop=stop)
    finally:
        for sig, handler in stop.previous.items():
            signal.signal(sig, handler)
    assert first.stopped and sorted(first.losses) == [1] and first.checkpoint.endswith("step_00000001")
    assert first.samples == []  # an interrupted run does not sample
    resumed = train(_cfg(tmp_path, "split", "train.steps=4"))
    assert not resumed.stopped and sorted(resumed.losses) == [2, 3, 4]
    assert [resumed.losses[s] for s in (2, 3, 4)] == [full.losses[s] for s in (2, 3, 4)]


def test_triton_kernels_train_exactly_like_the_torch_kernels(tmp_path):
    """kernels=triton (through the Triton interpreter on this CPU) and kernels=torch give the same training losses;
    kernels=triton without a GPU or the interpreter stops before training with a clear message."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mdm_scale.metrics import read_metrics

    root = Path(__file__).resolve().parents[2]

    def run(kernels, **env):
        cmd = [sys.executable, str(root / "launchers" / "local.py"), "config=tiny", *FAST, "train.steps=2",
               "sampling.num_samples=0", "logging.log_every=1", f"kernels={kernels}", f"run_dir={tmp_path / kernels}",
               f"data.cache_dir={tmp_path / 'cache'}"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600,
                              env={**os.environ, "TRITON_INTERPRET": "0", **env})

    def losses(kernels):
        return [m["train/loss"] for m in read_metrics(tmp_path / kernels) if "train/loss" in m]

    refused = run("triton")
    assert refused.returncode != 0 and "kernels=triton needs a CUDA device" in refused.stderr
    assert run("torch").returncode == 0
    interpreted = run("triton", TRITON_INTERPRET="1")
    assert interpreted.returncode == 0, interpreted.stderr[-3000:]
    torch_losses, triton_losses = losses("torch"), losses("triton")
    assert len(torch_losses) == 2 and triton_losses == pytest.approx(torch_losses, rel=1e-5)


def test_schedule_gradient_norm_is_logged_for_learned_schedules_only(dims, tmp_path):
    """train/grad_norm_schedule (the learned schedule's share of the gradient, before clipping) tells a spike of
    the score-function term apart from one of the network: present for mdm_ls, absent for mdlm, <= the total."""
    from mdm_scale.metrics import read_metrics

    for objective in ("mdm_ls", "mdlm"):
        train(_cfg(tmp_path, objective, f"objective={objective}", "train.steps=2", "logging.log_every=1",
                   "sampling.num_samples=0"))
        rows = [r for r in read_metrics(tmp_path / objective) if "train/loss" in r]
        has = ["train/grad_norm_schedule" in r for r in rows]
        assert has == [objective == "mdm_ls"] * 2, rows
        if objective == "mdm_ls":
            assert all(0 < r["train/grad_norm_schedule"] <= r["train/grad_norm"] * (1 + 1e-6) for r in rows), rows
