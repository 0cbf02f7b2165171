"""The one training loop: data -> noise -> denoiser -> NELBO -> AdamW step, with eval, checkpoints and samples.

    python launchers/local.py config=tiny [objective=lomdm] [key=value ...]
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from megatron.core import tensor_parallel
from torch import nn

from data_pipeline.datasets import embedded_corpus_shards, open_split, remote_cache_root, split_document_ids
from data_pipeline.tokenizer import load_tokenizer
from mdm_scale.config import LEARNED_KINDS, RunConfig, check_layout
from mdm_scale.evaluation import evaluate_nelbo, order_form, truncation_biased
from mdm_scale.metrics import MetricsLogger
from mdm_scale.model import build_model
from mdm_scale.objective import training_nelbo
from mdm_scale.pipeline import last_stage_mean, pipeline_nelbo, sync_pipeline_replicas
from mdm_scale.preemption import StopRequest
from mdm_scale.run_directory import claim_run_directory
from mdm_scale.sampling import generate, sampler_options
from mdm_scale.schedules import is_schedule_parameter
from mdm_scale.time_sampling import TimeSampler
from parallel.checkpoint import CheckpointError, CheckpointWriteError, latest_checkpoint, save_checkpoint
from parallel.clipping import ScheduleClip
from parallel.consolidate import RankLayout, model_layout, partition_dims, to_global, to_local
from parallel.distributed import ParallelDims, init_distributed, world_size_from_env
from parallel.engine import build_engine, safe_checkpoint_globals


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss (per-token NELBO estimate) of every step run in this call."""
    evals: dict[int, float] = field(default_factory=dict)
    """Held-out NELBO per evaluated step."""
    checkpoint: str | None = None
    samples: list[str] = field(default_factory=list)
    stopped: bool = False
    """True when a signal (StopRequest) ended the run early, after a checkpoint."""
    skipped: list[int] = field(default_factory=list)
    """Steps of this call dropped for a non-finite loss or gradient (train.nonfinite=skip)."""


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_training_engine(model: nn.Module, cfg: RunConfig, dims: ParallelDims):
    """AdamW with warm-up + cosine decay, wrapped by the engine `cfg.parallel` asks for (plain, or DeepSpeed ZeRO).

    Two parameter groups: the network at lr and the learned schedule's parameters at schedule_lr_mult x lr (LambdaLR
    scales each group's own base lr, so both follow the same warm-up and cosine); an empty group is left out.
    With a learned schedule the engine measures the schedule's gradient norm over the whole model, and with
    optimizer.schedule_grad_clip it clips the two sets on their own norms (parallel/clipping.py)."""
    opt = cfg.optimizer
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not is_schedule_parameter(n)], "lr": opt.lr},
              {"params": [p for n, p in named if is_schedule_parameter(n)], "lr": opt.lr * opt.schedule_lr_mult}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=opt.lr, betas=tuple(opt.betas),
                                  eps=opt.eps, weight_decay=opt.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup=opt.warmup_steps, total=cfg.train.steps, min_ratio=opt.min_lr_ratio)
    )
    schedule_clip = None
    if cfg.objective.schedule.kind in LEARNED_KINDS:  # on every pipeline stage: its norms are collective
        schedule_clip = ScheduleClip(model, groups[1]["params"], opt.grad_clip, opt.schedule_grad_clip,
                                     shared=not opt.schedule_grad_clip)
    return build_engine(model, optimizer, lr_schedule, zero_stage=cfg.parallel.zero_stage, grad_clip=opt.grad_clip,
                        grad_accumulation=cfg.data.grad_accumulation, micro_batch_size=cfg.data.micro_batch_size,
                        pipeline_parallel=dims.pipeline_parallel, schedule_clip=schedule_clip)


def _eval_batches(data_root: Path, tokenizer, cfg: RunConfig, remote: str | None) -> list[torch.Tensor]:
    """A fixed random sample of held-out windows (seed 0), spread over every source of the held-out split."""
    heldout = open_split(data_root, "heldout", tokenizer, seq_len=cfg.data.seq_len,
                         batch_size=cfg.data.micro_batch_size, seed=0, remote=remote)
    return list(itertools.islice(heldout, min(cfg.train.eval_batches, heldout.batches_per_epoch)))


def _trainer_state(step, generator, batches, sampler) -> dict:
    return {
        "step": step,
        "noise_rng": generator.get_state(),
        "time_sampler": sampler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8),
        "tracker_rng": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "data": batches.state_dict(),
    }


def _restore_trainer_state(state, generator, batches, sampler) -> None:
    generator.set_state(state["noise_rng"])
    if "time_sampler" in state:
        sampler.load_state_dict(state["time_sampler"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker_rng"])
    batches.load_state_dict(state["data"])


def train(cfg: RunConfig, stop: StopRequest | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg`; returns losses, evals, checkpoint path and samples.

    With `stop`, a signal recorded by it ends the run after the current step with a checkpoint
    (`TrainResult.stopped`); running the same config again resumes there.
    """
    check_layout(cfg, world_size_from_env())
    dims = init_distributed(tensor_parallel=cfg.parallel.tensor_parallel,
                            pipeline_parallel=cfg.parallel.pipeline_parallel, device=cfg.train.device,
                            seed=cfg.train.seed)
    with claim_run_directory(cfg, is_main=dims.is_main):  # locked; its config.yaml is this run's
        return _train(cfg, dims, stop)


def _train(cfg: RunConfig, dims: ParallelDims, stop: StopRequest | None) -> TrainResult:
    dp_rank, dp_size = dims.data_parallel_rank, dims.data_parallel
    shard = f"tp{dims.tensor_parallel_rank}-pp{dims.pipeline_parallel_rank}-dp{dp_rank}"
    run_dir = Path(cfg.run_dir)

    tokenizer, batches, eval_batches = _open_data(cfg, dims, dp_rank, dp_size)

    # Model, optimizer engine (AdamW, or DeepSpeed ZeRO across ranks), noise generator.
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, tokenizer.vocab_size, dims)
    denoiser, schedule = model["denoiser"], model["schedule"]
    engine = build_training_engine(model, cfg, dims)
    generator = torch.Generator().manual_seed(cfg.train.seed + 1)
    sampler = TimeSampler.from_config(cfg.objective)  # P-POTS statistics: identical on every rank, checkpointed
    ckpt_dir = run_dir / "checkpoints"
    layout = model_layout(model)  # checkpoints use layout-independent (global) tensor names
    ckpt = _resume(cfg, ckpt_dir, shard, model, engine, generator, batches, sampler)
    step = ckpt.step if ckpt else 0
    logger = MetricsLogger(cfg.logging, run_dir=str(run_dir), run_name=cfg.name, config=asdict(cfg),
                           total_steps=cfg.train.steps, start_step=step, enabled=dims.is_main)
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if missing:  # megatron-core's own import-time warnings are silenced (mdm_scale/__init__.py)
        logger.write(f"megatron-core: {' and '.join(missing)} not installed; using its torch fallbacks")
    if step:
        logger.write(f"resumed from {ckpt.path} at step {step}")
    result = TrainResult(step=step)

    def evaluate() -> None:
        with _autocast(cfg, dims):
            metrics = evaluate_nelbo(denoiser, schedule, eval_batches, cfg.objective,
                                     time_samples=cfg.train.eval_time_samples, device=dims.device)
            if truncation_biased(cfg.objective):  # the unbiased value beside the run's own (optimistic) one
                metrics["nelbo_order_form"] = evaluate_nelbo(
                    denoiser, schedule, eval_batches, order_form(cfg.objective),
                    time_samples=cfg.train.eval_time_samples, device=dims.device)["nelbo"]
        result.evals[step] = metrics["nelbo"]
        logger.write(f"eval step {step}: nelbo {metrics['nelbo']:.4f} ppl<= {metrics['ppl_bound']:.1f}"
                     + (f" (order form {metrics['nelbo_order_form']:.4f})" if "nelbo_order_form" in metrics else ""))
        logger.log(step, {f"eval/{k}": v for k, v in metrics.items()})

    def checkpoint(final: bool = False) -> None:
        """A failed save (disk full, ...) leaves the earlier checkpoints intact: a periodic one is reported and
        retried at the next interval; the final one (end of run or stop signal) stops the run with the error."""
        try:
            path = save_checkpoint(ckpt_dir, step, model=to_global(model.state_dict(), layout),
                                   optimizer=engine.optimizer_state(),
                                   trainer=_trainer_state(step, generator, batches, sampler), shard=shard,
                                   keep=cfg.checkpoint.keep, metadata=partition_dims(layout),
                                   optimizer_replicated=cfg.parallel.zero_stage == 0)
        except CheckpointWriteError as e:
            if final:
                raise
            logger.write(f"WARNING: {e}; training continues, next attempt at step {step + cfg.checkpoint.every}")
            return
        result.checkpoint = str(path)

    if step == 0:
        evaluate()
    last_step = min(cfg.train.stop_at or cfg.train.steps, cfg.train.steps)
    model.train()
    dp = {"data_parallel_rank": dp_rank, "data_parallel_size": dp_size,
          "data_parallel_group": dims.groups.dp}
    while step < last_step:
        outcome = _optimizer_step(cfg, dims, model, engine, batches=batches, generator=generator, sampler=sampler,
                                  step=step, dp=dp)
        step += 1
        loss = _data_parallel_mean(outcome.loss, dims)
        result.losses[step] = loss
        if not outcome.finite:
            result.skipped.append(step)
            logger.write(f"WARNING: skipped step {step}: non-finite loss or gradient (loss {loss}); no update "
                         f"(train.nonfinite=skip, {len(result.skipped)} skipped so far)")
        logger.step(step, outcome.tokens, {"loss": loss, "grad_norm": outcome.grad_norm, "lr": engine.lr,
                                           **({"grad_norm_schedule": outcome.schedule_norm}
                                              if outcome.schedule_norm is not None else {})})
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            evaluate()
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            checkpoint()
        if stop is not None and step < last_step and stop.agreed(dims.device):
            name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
            logger.write(f"stopping at step {step} on signal {name}: checkpoint, then resume from it")
            result.stopped = True
            break
    if step >= cfg.train.steps and step not in result.evals:
        evaluate()
    if result.checkpoint is None or not result.checkpoint.endswith(f"{step:08d}"):
        checkpoint(final=True)
    result.step = step
    if step >= cfg.train.steps and cfg.sampling.num_samples and dims.pipeline_parallel > 1:
        logger.write("sampling with pipeline parallelism is not supported yet; no samples printed")
    elif step >= cfg.train.steps and cfg.sampling.num_samples:
        result.samples = _sample(cfg, denoiser, schedule, tokenizer, dims, logger)
        if dims.is_main:
            (run_dir / "samples.txt").write_text("\n\n-----\n\n".join(result.samples))
    logger.write(f"checkpoint: {result.checkpoint}")
    logger.close()
    return result


def _resume(cfg: RunConfig, ckpt_dir: Path, shard: str, model: nn.ModuleDict, engine, generator, batches, sampler):
    """Load the newest verified checkpoint of the run (saved on any layout: resharded) into the weights, the
    optimizer and the trainer state (noise RNG, time sampler, data position); None when there is none."""
    if not cfg.checkpoint.resume:
        return None
    ckpt = latest_checkpoint(ckpt_dir, shard, safe_globals=safe_checkpoint_globals(), reshard=RankLayout.of(model))
    if ckpt is None:
        return None
    try:
        model.load_state_dict(to_local(ckpt.model, model_layout(model)))
    except RuntimeError as e:  # the run-directory check makes this rare: a config.yaml edited by hand
        raise CheckpointError(f"{ckpt.path} does not fit this model ({str(e).splitlines()[0]} ...)") from None
    engine.load_optimizer_state(ckpt.optimizer)
    _restore_trainer_state(ckpt.trainer, generator, batches, sampler)
    return ckpt


def _open_data(cfg: RunConfig, dims: ParallelDims, dp_rank: int, dp_size: int):
    """(tokenizer, resumable training batches of this DP rank, the fixed held-out batches): checksummed shards,
    the user's or the embedded corpus packed on first use."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cache_dir = Path(cfg.data.cache_dir).expanduser()
    remote = cfg.data.remote or None
    if remote:
        data_root = remote_cache_root(remote, cache_dir)
    elif cfg.data.path:
        data_root = Path(cfg.data.path).expanduser()
    else:
        if dims.is_main:
            embedded_corpus_shards(cfg.data.source, tokenizer, cfg.data.seq_len, cache_dir)
        torch.distributed.barrier()
        data_root = embedded_corpus_shards(cfg.data.source, tokenizer, cfg.data.seq_len, cache_dir)
    batches = open_split(data_root, "train", tokenizer, seq_len=cfg.data.seq_len,
                         batch_size=cfg.data.micro_batch_size, seed=cfg.train.seed, rank=dp_rank, world_size=dp_size,
                         num_workers=cfg.data.num_workers, remote=remote)
    return tokenizer, batches, _eval_batches(data_root, tokenizer, cfg, remote)


@dataclass
class StepOutcome:
    """What one optimizer step reports to the loop."""

    loss: float
    """This rank's mean NELBO over its micro-batches (the loop averages it over data parallelism)."""
    finite: bool
    """False when any rank saw a non-finite loss or gradient (the update was skipped or the run stops)."""
    grad_norm: float
    """The global gradient norm before clipping."""
    schedule_norm: float | None
    """The learned schedule's gradient norm before clipping over the whole model, None without a learned
    schedule."""
    tokens: int
    """Tokens of the global step (rows: a paired objective counts both draws)."""


def _optimizer_step(cfg: RunConfig, dims: ParallelDims, model: nn.ModuleDict, engine, *, batches, generator,
                    sampler, step: int, dp: dict) -> StepOutcome:
    """One optimizer step over grad_accumulation micro-batches [b, l] (tokens, and document ids when the data was
    packed per document): forward and backward (megatron's 1F1B schedule under PP), the all-rank finiteness
    check before the update, the update, and the time sampler's statistics."""
    denoiser, schedule = model["denoiser"], model["schedule"]
    split = [split_document_ids(next(batches).to(dims.device)) for _ in range(cfg.data.grad_accumulation)]
    micro_batches, document_ids = [x for x, _ in split], [ids for _, ids in split]
    with _autocast(cfg, dims):
        if dims.pipeline_parallel > 1:
            all_terms = pipeline_nelbo(denoiser, schedule, micro_batches, cfg.objective, generator,
                                       sampler=sampler, document_ids=document_ids, **dp)
            loss = last_stage_mean([terms.nelbo.item() for terms in all_terms], dims.device, dims.groups)
            sync_pipeline_replicas(schedule, dims.groups)
            finite = True  # the loss (on every stage) and the gradients are checked below
        else:
            loss, finite, all_terms = 0.0, True, []
            for x0, ids in zip(micro_batches, document_ids):
                terms = training_nelbo(denoiser, schedule, x0, cfg.objective, generator, sampler=sampler,
                                       document_ids=ids, **dp)
                engine.backward(terms.loss)
                loss += terms.nelbo.item() / len(micro_batches)
                finite = finite and math.isfinite(terms.loss.item())
                all_terms.append(terms)
    # A NaN/inf is caught before the optimizer applies it; every rank takes the same decision.
    finite = _all_ranks_finite(finite and math.isfinite(loss), model, dims.device)
    if not finite and cfg.train.nonfinite == "stop":
        raise FloatingPointError(f"non-finite loss or gradient at step {step + 1} (loss {loss}); stopped before "
                                 f"the update, nothing saved (train.nonfinite=stop; 'skip' drops such steps)")
    grad_norm = engine.step(skip=not finite)
    if finite:  # this step's losses shape the next steps' time proposal / baseline (all ranks alike)
        sampler.observe(*(torch.cat([getattr(x, k) for x in all_terms]) if all_terms else torch.zeros(0)
                          for k in ("t", "per_sequence", "t_weight", "token_square")))
    paired = cfg.objective.mask_pairs == "mirror" or cfg.objective.score_baseline == "two_draw"  # rows = 2 x data
    tokens = sum(x.numel() for x in micro_batches) * dims.data_parallel * (2 if paired else 1)
    return StepOutcome(loss, finite, grad_norm, engine.schedule_norm, tokens)


def _autocast(cfg: RunConfig, dims: ParallelDims):
    """bf16 autocast on GPU (train.precision auto or bf16), nothing on CPU."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and dims.device.type == "cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _all_ranks_finite(finite: bool, model: nn.Module, device: torch.device) -> bool:
    """False on every rank when any rank saw a non-finite loss or holds a non-finite gradient (gradients that
    DeepSpeed ZeRO 2 keeps in its own partitions are checked by its overflow test instead)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bad = torch.tensor([0.0 if finite else 1.0], device=device)
    if grads:  # a NaN/inf anywhere makes that gradient's norm non-finite (one fused kernel per dtype on GPU)
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        bad += (~torch.isfinite(norms.sum())).float().to(device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0


def _data_parallel_mean(value: float, dims: ParallelDims) -> float:
    """Average a per-rank scalar over the data-parallel group (the global batch's loss)."""
    if dims.data_parallel == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dims.device)
    torch.distributed.all_reduce(t, group=dims.groups.dp)
    return t.item() / dims.data_parallel


def _sample(cfg, denoiser, schedule, tokenizer, dims, logger) -> list[str]:
    generator = torch.Generator().manual_seed(cfg.train.seed + 2)
    sample = generate(denoiser, schedule, num_samples=cfg.sampling.num_samples, seq_len=cfg.sampling.seq_len,
                      generator=generator, device=dims.device, **sampler_options(cfg.sampling))
    texts = [tokenizer.decode(row.tolist()) for row in sample.tokens.cpu()]
    for i, text in enumerate(texts):
        logger.write(f"--- sample {i} (NFE {sample.nfe}, policy {cfg.sampling.policy}) ---\n{text}")
    return texts
