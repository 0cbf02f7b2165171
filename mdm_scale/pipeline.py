"""The NELBO step under megatron-core's pipeline schedules (1F1B with PP > 1, plain accumulation with PP = 1).

Every stage draws the noise of every micro-batch from the same generator, so the first stage can build z_t and
the last stage can weight the loss without shipping masks along the pipeline. LoMDM needs the forward
scheduler's exponents (a head on the *last* stage, reading clean-x features) to mask on the *first* stage:

    pass 1  clean x through the pipeline, forward only; the last stage keeps the features and broadcasts the
            head's logits (values) to every stage of its pipeline group
    pass 2  z_t through the pipeline with 1F1B; the last stage recomputes the logits from the kept features
            with gradients (phi), the backward head reads pass 2's features (psi)

as in objective.py, where both passes run on one stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor

from mdm_scale.config import ObjectiveConfig
from mdm_scale.denoiser import Denoiser
from mdm_scale.objective import (NelboTerms, apply_noise, check_batch, document_masks, nelbo_from_features,
                                 training_noise)
from mdm_scale.schedules import Schedule
from mdm_scale.time_sampling import TimeSampler
from parallel.distributed import group_size


def _broadcast_from_last_stage(tensor: Tensor, groups: ProcessGroupCollection | None) -> Tensor:
    stages = group_size(groups, "pp")
    if stages == 1:
        return tensor
    dist.broadcast(tensor, src=dist.get_global_rank(groups.pp, stages - 1), group=groups.pp)
    return tensor


def pipeline_nelbo(
    denoiser: Denoiser,
    schedule: Schedule,
    micro_batches: list[Tensor],
    cfg: ObjectiveConfig,
    generator: torch.Generator,
    *,
    sampler: TimeSampler | None = None,
    forward_only: bool = False,
    document_ids: list[Tensor | None] | None = None,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    data_parallel_group=None,
) -> list[NelboTerms]:
    """Forward (and backward unless `forward_only`) of the NELBO over `micro_batches` through the pipeline.

    Gradients accumulate in the parameters of this stage, averaged over micro-batches. Returns the NelboTerms
    of each micro-batch on the last stage (empty elsewhere).

    Args:
        micro_batches: [b, l] clean token ids, the same list on every stage.
        generator: the training noise generator; advanced identically on every stage.
        sampler: the run's time sampler (identical on every rank); None = a fresh one from `cfg`.
        document_ids: per micro-batch [b, l] document ids of packed sequences, or None (see `objective.nelbo`).
        data_parallel_rank, data_parallel_size, data_parallel_group: as in `objective.training_nelbo` (noise of
            the global micro-batch, this rank's strided slice; global RLOO baseline).
    """
    b, l = micro_batches[0].shape
    device = micro_batches[0].device
    sampler = sampler or TimeSampler.from_config(cfg)
    noise = [training_noise(b, l, cfg, sampler, generator, device, data_parallel_rank=data_parallel_rank,
                            data_parallel_size=data_parallel_size) for _ in micro_batches]
    for n, x in zip(noise, micro_batches):
        check_batch(x, n.t[: x.shape[0]], denoiser.vocab_size)
    # Every stage pairs the rows the same way (MIRROR and two_draw double them).
    micro_batches = [n.rows(x) for n, x in zip(noise, micro_batches)]
    document_ids = [n.rows(ids) for n, ids in zip(noise, document_ids or [None] * len(micro_batches))]
    b = micro_batches[0].shape[0]
    masks, loss_masks = zip(*[document_masks(ids) for ids in document_ids])
    reduce_group = data_parallel_group if data_parallel_size > 1 else None
    run = get_forward_backward_func()
    last_stage = denoiser.post_process

    # Pass 1 (LoMDM): forward-scheduler logits of the clean sequences, known on every stage.
    clean_features: list[Tensor | None] = [None] * len(micro_batches)
    forward_logits: list[Tensor | None] = [None] * len(micro_batches)
    if schedule.needs_clean_features:

        def clean_step(data_iterator, model):
            i = next(data_iterator)
            out = model(micro_batches[i], torch.zeros(b, device=device), masks[i])

            def keep(hidden):
                clean_features[i] = hidden.detach()
                return hidden.sum() * 0, {}

            return out, keep

        with torch.no_grad():
            run(forward_step_func=clean_step, data_iterator=iter(range(len(micro_batches))), model=[denoiser],
                num_microbatches=len(micro_batches), seq_length=l, micro_batch_size=b, forward_only=True)
        for i in range(len(micro_batches)):
            logits = (denoiser.scheduler_logits("forward_scheduler", clean_features[i], masks[i]).detach()
                      if last_stage else torch.empty(b, l, device=device))
            forward_logits[i] = _broadcast_from_last_stage(logits, denoiser.process_groups)

    # Pass 2: z_t through the pipeline; the loss on the last stage.
    terms_out: list[NelboTerms] = []

    def train_step(data_iterator, model):
        i = next(data_iterator)
        t, t_weight, uniforms = noise[i].t, noise[i].t_weight, noise[i].uniforms
        noised = apply_noise(denoiser, schedule, micro_batches[i], t, t_weight, uniforms, forward_logits[i],
                             cfg.estimator)
        out = model(noised.z_t, noised.t.float(), masks[i])

        def loss(hidden):
            logits = None
            if schedule.needs_clean_features:  # recompute with gradients for phi, same values
                logits = denoiser.scheduler_logits("forward_scheduler", clean_features[i], masks[i])
            with_grad = apply_noise(denoiser, schedule, micro_batches[i], t, t_weight, uniforms, logits,
                                    cfg.estimator)
            terms = nelbo_from_features(denoiser, schedule, with_grad, hidden, velocity_weight=cfg.velocity_weight,
                                        score_function=cfg.score_function and not forward_only,
                                        reduce_group=reduce_group, loss_mask=loss_masks[i],
                                        mirrored=noise[i].mirrored, baseline=noise[i].baseline,
                                        two_draw=noise[i].two_draw, attention_mask=masks[i])
            terms_out.append(terms)
            return terms.loss, {"nelbo": terms.nelbo}

        return out, loss

    run(forward_step_func=train_step, data_iterator=iter(range(len(micro_batches))), model=[denoiser],
        num_microbatches=len(micro_batches), seq_length=l, micro_batch_size=b, forward_only=forward_only)
    return terms_out


def last_stage_mean(values: list[float], device: torch.device, groups: ProcessGroupCollection | None) -> float:
    """Mean of per-micro-batch values that only the last pipeline stage holds, known on every stage."""
    t = torch.tensor([sum(values) / len(values) if values else 0.0], dtype=torch.float64, device=device)
    return _broadcast_from_last_stage(t, groups).item()


def sync_pipeline_replicas(module: torch.nn.Module, groups: ProcessGroupCollection | None) -> None:
    """Sum the gradients of parameters replicated on every stage (MDM(LS) position logits: used to mask on the
    first stage, differentiated on the last) so all copies take the same step."""
    if group_size(groups, "pp") == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=groups.pp)
