"""The optimizer step behind one interface: plain AdamW on one process, DeepSpeed (ZeRO 0/1/2) across ranks.

DeepSpeed owns data parallelism (gradient all-reduce or ZeRO reduce-scatter), gradient accumulation, clipping
and the sharding of optimizer state; megatron's `parallel_state` is its `mpu`, as in Megatron-DeepSpeed, so
tensor-parallel duplicates are counted once in the global gradient norm.

Optimizer state leaves an engine per parameter, under the weights' global names (`optimizer_state`), and enters
one the same way (`load_optimizer_state`), so a checkpoint does not depend on how the engine partitions it:
torch's state for plain AdamW and ZeRO 0, DeepSpeed's `safe_get/set_full_optimizer_state` (its public API for
the ZeRO 1/2 partitions behind a parameter) otherwise.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from parallel.clipping import ScheduleClip


class MegatronMPU:
    """megatron-core's parallel_state with the three methods DeepSpeed asks of an `mpu` that it lacks."""

    def __getattr__(self, name: str):
        return getattr(parallel_state, name)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=parallel_state.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        # DeepSpeed counts a parameter without a tensor-parallel attribute in the gradient norm only where this is
        # 0, then sums over the model-parallel group (TP x PP). Such parameters are duplicated across TP ranks but
        # distinct across pipeline stages, so the answer is the TP rank: the norm then matches one process.
        return parallel_state.get_tensor_model_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())


class Engine:
    """What the loop needs of an optimizer engine: backward per micro-batch, step per optimizer step, state."""

    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    schedule_clip: ScheduleClip | None = None

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, skip: bool = False) -> float:
        """Finish the optimizer step; returns the global gradient norm before clipping.

        With `skip` (a non-finite loss or gradient, see `train.nonfinite`) the accumulated gradients are dropped
        and nothing changes: no parameter update, no optimizer-state update, no LR-schedule step (as DeepSpeed and
        Megatron treat an overflowed step); returns NaN. Every rank must pass the same `skip`.
        """
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self.lr_schedule.get_last_lr()[0]

    def _forget_norms(self) -> None:
        if self.schedule_clip is not None:
            self.schedule_clip.last_norms = None

    @property
    def schedule_norm(self) -> float | None:
        """The learned schedule's gradient norm of the last step, before clipping, over the whole model (the same on
        every layout); None without a learned schedule, NaN after a skipped step."""
        if self.schedule_clip is None:
            return None
        norms = self.schedule_clip.last_norms
        return float(norms[1]) if norms is not None else float("nan")

    def optimizer_state(self) -> dict[str, Any]:
        """Per-parameter state under global tensor names: {"per_parameter": {key: {name: tensor}}, "steps":
        {name: step}, "lr_schedule": {...}}; tensors are this rank's TP slice, like its weights. Collective over
        the data-parallel group with ZeRO (every rank gets the whole of its parameters' moments)."""
        names = _global_names(self.model)
        moments: dict[str, dict[str, torch.Tensor]] = {}
        steps: dict[str, float] = {}
        for param, state in self._parameter_states().items():
            for key, value in state.items():
                if key == "step":
                    steps[names[param]] = value
                else:
                    moments.setdefault(key, {})[names[param]] = value
        return {"per_parameter": moments, "steps": steps, "lr_schedule": self.lr_schedule.state_dict()}

    def _parameter_states(self) -> dict[nn.Parameter, dict[str, Any]]:
        """{parameter: {"step": float, key: tensor shaped like it}} of the parameters that have optimizer state
        (torch's AdamW creates it at a parameter's first gradient)."""
        states = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if state:
                    states[param] = {k: float(v) if k == "step" else v for k, v in state.items()
                                     if k == "step" or (torch.is_tensor(v) and v.shape == param.shape)}
        return states

    def _set_parameter_states(self, states: dict[nn.Parameter, dict[str, Any]]) -> None:
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                self.optimizer.state.pop(param, None)
                if param in states:
                    self.optimizer.state[param] = {
                        k: torch.tensor(v, dtype=torch.float32) if k == "step" else v.to(param.device, param.dtype)
                        for k, v in states[param].items()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Restore the optimizer's moments and the schedule's position from a checkpoint, keeping the
        hyper-parameters this engine was built with (lr, betas, eps, weight decay, the LambdaLR multiplier): a
        resumed run follows its current config, not the values saved with the state (torch's load_state_dict
        would silently bring those back)."""
        groups = [{k: g[k] for k in _HYPERPARAMETERS if k in g} for g in self.optimizer.param_groups]
        base_lrs = list(self.lr_schedule.base_lrs)
        self._load_state(state)
        for group, configured in zip(self.optimizer.param_groups, groups):
            group.update(configured)
        schedule = self.lr_schedule
        schedule.base_lrs = base_lrs
        lrs = [base * factor(schedule.last_epoch) for base, factor in zip(base_lrs, schedule.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        schedule._last_lr = lrs

    def _load_state(self, state: dict[str, Any]) -> None:
        if "per_parameter" in state:
            self._load_per_parameter(state)
        else:  # checkpoints from before per-parameter state: torch's state dict of this very layout
            self._load_legacy_state(state)
        self.lr_schedule.load_state_dict(state["lr_schedule"])

    def _load_legacy_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def _load_per_parameter(self, state: dict[str, Any]) -> None:
        """Moments and step counts by global name (this rank's TP slices); a parameter without saved state
        starts fresh, as it would have in the saving run. Call after loading the weights into the model."""
        names = _global_names(self.model)
        states = {}
        for param, name in names.items():
            moments = {key: by_name[name] for key, by_name in state["per_parameter"].items() if name in by_name}
            if moments:
                states[param] = {"step": float(state["steps"][name]), **moments}
        self._set_parameter_states(states)


def _global_names(model: nn.Module) -> dict[nn.Parameter, str]:
    from parallel.consolidate import model_layout

    layout = model_layout(model)
    return {param: layout[name].global_name for name, param in model.named_parameters()}


_HYPERPARAMETERS = ("betas", "eps", "weight_decay", "initial_lr")


class LocalEngine(Engine):
    """Single process: torch AdamW, global-norm clipping (or split: parallel/clipping.py), LR schedule stepped once
    per optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule, *, grad_clip: float,
                 grad_accumulation: int, schedule_clip: ScheduleClip | None = None):
        self.model, self.optimizer, self.lr_schedule = model, optimizer, lr_schedule
        self.grad_clip, self.grad_accumulation, self.schedule_clip = grad_clip, grad_accumulation, schedule_clip

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (averaged over the accumulation steps)."""
        (loss / self.grad_accumulation).backward()

    def step(self, skip: bool = False) -> float:
        """Clip, update, advance the LR schedule; returns the pre-clipping global gradient norm."""
        self._forget_norms()
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        if self.schedule_clip is not None:
            norm = self.schedule_clip.clip(self.model.parameters())
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or float("inf"))
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


class DeepSpeedEngine(Engine):
    """DeepSpeed engine with ZeRO stage `zero_stage` over megatron's data-parallel group.

    Managed (PP = 1): `backward` runs DeepSpeed's backward for each micro-batch, and its step for all but the last
    (DeepSpeed counts micro-steps and scales the loss by 1/accumulation itself); the step at the accumulation
    boundary, which updates, is `step`'s, so the loop can check the gradients first and skip it.
    External backward (PP > 1): megatron's pipeline schedule runs forward and backward on the bare module and
    averages over micro-batches; `step` then reduces gradients over data parallelism (ZeRO 0/1), clips and
    updates ("managed_gradient_accumulation": false, as ../shared/docs/STACK.md records working).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule, *, grad_clip: float,
                 grad_accumulation: int, micro_batch_size: int, zero_stage: int, external_backward: bool = False,
                 schedule_clip: ScheduleClip | None = None):
        import deepspeed

        self.external_backward = external_backward
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1 if external_backward else grad_accumulation,
            "managed_gradient_accumulation": not external_backward,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if zero_stage == 0 and (not grad_clip or schedule_clip is not None):
            config["gradient_clipping"] = float("inf")  # DeepSpeed then calls clip_fp32_gradients, which we replace
        if zero_stage > 0 and schedule_clip is not None:
            config["gradient_clipping"] = 0.0  # DeepSpeed still computes the norm; _clip_zero_apart clips
        self.engine, self.optimizer, _, self.lr_schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=lr_schedule, config=config, mpu=MegatronMPU(),
            dist_init_required=False,
        )
        self.model, self.schedule_clip = model, schedule_clip
        if zero_stage == 0:
            self._keep_clipping_norm(schedule_clip)
        elif schedule_clip is not None:
            self._clip_zero_apart(schedule_clip)

    def _keep_clipping_norm(self, schedule_clip: ScheduleClip | None) -> None:
        """ZeRO 0 with a torch optimizer: DeepSpeed computes the global gradient norm when it clips (after the
        data-parallel reduction, before the update, TP-aware through the mpu) but drops it, so
        get_global_grad_norm() is None. Keep the value its clipping returns; ZeRO 1/2 record theirs. With a split
        clip, the gradients (already reduced over data parallelism) are clipped set by set, counted as DeepSpeed
        counts them: tensor-parallel shards on every TP rank, duplicated parameters on TP rank 0."""
        from deepspeed.runtime.utils import clip_grad_norm_, is_model_parallel_parameter

        engine = self.engine
        tp_rank = parallel_state.get_tensor_model_parallel_rank()

        def model_parallel_sum(t: torch.Tensor) -> None:
            if MegatronMPU().get_model_parallel_world_size() > 1:
                dist.all_reduce(t, group=parallel_state.get_model_parallel_group())

        def clip_and_keep_norm():
            if schedule_clip is not None:
                engine._global_grad_norm = schedule_clip.clip(
                    engine.module.parameters(), counted=lambda p: tp_rank == 0 or is_model_parallel_parameter(p),
                    reduce=model_parallel_sum)
            else:
                engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                           max_norm=engine.gradient_clipping(), mpu=engine.mpu)

        engine.clip_fp32_gradients = clip_and_keep_norm

    def _clip_zero_apart(self, schedule_clip: ScheduleClip) -> None:
        """ZeRO 1/2: DeepSpeed (told not to clip) computes the gradient norm in `scaled_global_norm` from each
        rank's partitions, then updates one flat group at a time in `_optimizer_step(i)`. Replace the first by the
        two set norms (its own counting rule and reductions: data-parallel, then model-parallel), and scale each
        flat group's partition gradient by its set's factor before the second. Each flat group is one AdamW param
        group, so all of one set (mdm_scale.train builds them so)."""
        zero = self._zero()
        missing = [a for a in ("scaled_global_norm", "_optimizer_step", "averaged_gradients", "params_in_partition",
                               "single_partition_of_fp32_groups", "_model_parallel_all_reduce") if not hasattr(zero, a)]
        if missing:
            raise RuntimeError(f"optimizer.schedule_grad_clip with ZeRO 1/2 relies on DeepSpeedZeroOptimizer's "
                               f"{', '.join(missing)}, which this DeepSpeed lacks; use parallel.zero_stage=0 or "
                               f"optimizer.schedule_grad_clip=0")
        from deepspeed.runtime.utils import is_model_parallel_parameter

        set_of_group = []
        for params in zero.bit16_groups:
            sets = {schedule_clip.set_of(p) for p in params}
            if len(sets) > 1:
                raise RuntimeError("a ZeRO parameter group mixes schedule and denoiser parameters; split clipping "
                                   "needs them in separate optimizer groups")
            set_of_group.append(sets.pop() if sets else 0)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        factors: list[float] = [1.0, 1.0]

        def reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, group=zero.dp_process_group)
            zero._model_parallel_all_reduce(tensor=t, op=dist.ReduceOp.SUM)

        def pairs():
            """(parameter, gradient partition) of this rank, counted as DeepSpeed counts them."""
            for i in range(len(zero.bit16_groups)):
                grads = [g for g in zero.averaged_gradients[i] or () if not getattr(g, "_zero_padding", False)]
                for grad, param in zip(grads, zero.params_in_partition[i]):
                    if tp_rank == 0 or is_model_parallel_parameter(param):
                        yield param, grad

        def scaled_global_norm(norm_type=2):
            norms = schedule_clip.norms(pairs(), reduce)
            factors[:] = schedule_clip.factors(norms)
            return norms.norm()

        update_group = zero._optimizer_step

        def clip_then_update(i):
            if factors[set_of_group[i]] != 1.0:
                zero.single_partition_of_fp32_groups[i].grad.mul_(factors[set_of_group[i]])
            update_group(i)

        zero.scaled_global_norm, zero._optimizer_step = scaled_global_norm, clip_then_update

    def backward(self, loss: torch.Tensor) -> None:
        if self.external_backward:
            raise RuntimeError("with pipeline parallelism the pipeline schedule runs the backward")
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # counts the micro-step; the update at the boundary waits for `step`

    def step(self, skip: bool = False) -> float:
        self._forget_norms()
        if skip:
            self._skipped_step()
            return float("nan")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _skipped_step(self) -> None:
        """DeepSpeed's boundary step taken as an overflowed one: its counters advance, gradients (and ZeRO's
        gradient partitions) are dropped, no update and no LR-schedule step, as for an fp16 overflow."""
        opt = self.engine.optimizer
        if hasattr(opt, "check_overflow"):  # ZeRO 1/2: its own overflow path clears the gradient partitions
            patch = {"check_overflow": lambda *args, **kwargs: setattr(opt, "overflow", True),
                     "check_grad_overflow": True}
        else:  # a plain torch optimizer (ZeRO 0, fp32): no update; `overflow` makes DeepSpeed count a skip
            patch = {"step": lambda *args, **kwargs: None, "overflow": True}
        saved = {k: opt.__dict__[k] for k in patch if k in opt.__dict__}
        opt.__dict__.update(patch)
        try:
            self.engine.step()
        finally:
            for k in patch:
                opt.__dict__.pop(k, None)
            opt.__dict__.update(saved)

    def _zero(self):
        """DeepSpeed's ZeRO 1/2 optimizer, or None (ZeRO 0: the torch optimizer itself)."""
        return self.optimizer if hasattr(self.optimizer, "single_partition_of_fp32_groups") else None

    def _parameter_states(self) -> dict[nn.Parameter, dict[str, Any]]:
        zero = self._zero()
        if zero is None:
            return super()._parameter_states()
        from deepspeed.utils import safe_get_full_optimizer_state

        flats, base = zero.single_partition_of_fp32_groups, zero.optimizer
        if not all(base.state.get(flat) for flat in flats):  # no step taken yet (DeepSpeed creates state lazily)
            return {}
        self._link_zero_states()
        states = {}
        for flat, params in zip(flats, zero.bit16_groups):
            keys = [k for k, v in base.state[flat].items() if torch.is_tensor(v) and v.shape == flat.shape]
            step = float(base.state[flat]["step"])
            for param in params:  # collective: all-reduced over the data-parallel group, parameter by parameter
                states[param] = {"step": step, **{k: safe_get_full_optimizer_state(param, k).cpu() for k in keys}}
        return states

    def _set_parameter_states(self, states: dict[nn.Parameter, dict[str, Any]]) -> None:
        """ZeRO: create the state of each flat partition, then let DeepSpeed copy every parameter's moments and
        fp32 master weights (from the loaded model) into the partitions that hold them."""
        zero = self._zero()
        if zero is None:
            return super()._set_parameter_states(states)
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        flats, base = zero.single_partition_of_fp32_groups, zero.optimizer
        for flat, params in zip(flats, zero.bit16_groups):
            saved = [states[p] for p in params if p in states]
            base.state.pop(flat, None)
            if not saved:
                continue
            keys = sorted({k for s in saved for k in s if k != "step"})
            base.state[flat] = {"step": torch.tensor(max(s["step"] for s in saved), dtype=torch.float32),
                                **{k: torch.zeros_like(flat) for k in keys}}
        self._link_zero_states()
        for params in zero.bit16_groups:
            for param in params:
                safe_set_full_fp32_param(param, param.detach())
                for key, value in states.get(param, {}).items():
                    if key != "step":
                        safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)

    def _link_zero_states(self) -> None:
        """Point DeepSpeed's per-parameter fragments at the flat partitions' current state (it links them lazily
        at its first step; before that, or after new state was set, the safe_* functions need it done)."""
        zero = self._zero()
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def _load_legacy_state(self, state: dict[str, Any]) -> None:
        if self._zero() is not None:  # this rank's partition, saved by the same layout
            states = [None] * parallel_state.get_data_parallel_world_size()
            states[parallel_state.get_data_parallel_rank()] = state["optimizer"]
            self.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            super()._load_legacy_state(state)


def safe_checkpoint_globals() -> list[Callable]:
    """Classes inside DeepSpeed optimizer state that `torch.load(weights_only=True)` must be allowed to build."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except Exception:  # DeepSpeed not importable: its classes cannot be in a checkpoint we wrote
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule, *, zero_stage: int,
                 grad_clip: float, grad_accumulation: int, micro_batch_size: int, pipeline_parallel: int = 1,
                 schedule_clip: ScheduleClip | None = None):
    """Plain AdamW on one process with zero_stage 0; DeepSpeed otherwise (any data parallelism or ZeRO).

    Args:
        zero_stage: 0 (replicated optimizer state), 1 (sharded state) or 2 (sharded state and gradients).
        pipeline_parallel: PP size; PP > 1 runs its backward in megatron's schedule (ZeRO 0 or 1 only).
        schedule_clip: for a model with a learned schedule (parallel/clipping.py): one shared clip or the
            schedule's gradient clipped on its own norm, and its norm measured for the log; None = one global norm
            at grad_clip.
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"parallel.zero_stage must be 0, 1 or 2, got {zero_stage}")
    if pipeline_parallel > 1:
        if zero_stage > 1:
            raise ValueError("parallel.zero_stage=2 is not supported with pipeline parallelism (use 0 or 1): "
                             "DeepSpeed's gradient partitioning expects to own the backward")
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        return DeepSpeedEngine(model, optimizer, lr_schedule, grad_clip=grad_clip, grad_accumulation=1,
                               micro_batch_size=micro_batch_size * grad_accumulation, zero_stage=zero_stage,
                               external_backward=True, schedule_clip=schedule_clip)
    if dist.get_world_size() == 1 and zero_stage == 0:
        return LocalEngine(model, optimizer, lr_schedule, grad_clip=grad_clip, grad_accumulation=grad_accumulation,
                           schedule_clip=schedule_clip)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # DeepSpeed reads LOCAL_RANK; torchrun and submitit set it, a lone `python launchers/local.py` does not.
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return DeepSpeedEngine(model, optimizer, lr_schedule, grad_clip=grad_clip, grad_accumulation=grad_accumulation,
                           micro_batch_size=micro_batch_size, zero_stage=zero_stage, schedule_clip=schedule_clip)
