"""Held-out NELBO (MDLM's protocol, scaled down): antithetic times, several per batch, a fixed noise seed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor

from data_pipeline.datasets import split_document_ids
from mdm_scale.config import ObjectiveConfig
from mdm_scale.denoiser import Denoiser
from mdm_scale.objective import document_masks, draw_noise, nelbo
from mdm_scale.pipeline import last_stage_mean, pipeline_nelbo
from mdm_scale.schedules import Schedule


@torch.no_grad()
def evaluate_nelbo(
    denoiser: Denoiser,
    schedule: Schedule,
    batches: Iterable[Tensor],
    cfg: ObjectiveConfig,
    *,
    time_samples: int = 2,
    seed: int = 1234,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean per-token NELBO over `batches`, with `time_samples` antithetic draws per batch.

    Batches are [b, l] token ids or [b, 2, l] (tokens, document ids) as `data_pipeline.datasets.open_split` gives.

    The noise comes from a generator seeded with `seed` each call, so successive evaluations of a changing
    model see identical t and masks (a less noisy curve). Returns nelbo, bits per token and the PPL bound.
    """
    was_training = denoiser.training
    denoiser.eval()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        x0, document_ids = (None if x is None else x.to(device) for x in split_document_ids(batch))
        tokens = x0.numel() if document_ids is None else int(document_masks(document_ids)[1].sum())
        if denoiser.config.pipeline_model_parallel_size > 1:  # the same noise, through the pipeline
            values = pipeline_nelbo(denoiser, schedule, [x0] * time_samples, replace(cfg, velocity_weight=1.0),
                                    generator, forward_only=True, document_ids=[document_ids] * time_samples)
            total += last_stage_mean(values, x0.device) * tokens * time_samples
            count += tokens * time_samples
            continue
        for _ in range(time_samples):
            t, t_weight, uniforms = draw_noise(x0.shape[0], x0.shape[1], cfg, generator, x0.device)
            terms = nelbo(denoiser, schedule, x0, t, t_weight, uniforms, velocity_weight=1.0, score_function=False,
                          document_ids=document_ids)
            total += terms.per_sequence.sum().item()
            count += tokens
    denoiser.train(was_training)
    if count == 0:
        raise ValueError("evaluate_nelbo got no batches")
    value = total / count
    return {"nelbo": value, "bits_per_token": value / math.log(2), "ppl_bound": math.exp(min(value, 700.0))}
