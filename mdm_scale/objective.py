"""One NELBO estimator for every schedule: MDLM, AR, block, MDM(LS) and LoMDM (docs/objective.md).

    L(x) = E_t E_{z_t} sum_{i: z_t^i = m} A_i(t) * (-log p_theta(x^i | z_t, t))          [+ LoMDM velocity term]

Per sequence we draw one t (`objective.t_sampler`: uniform, antithetic or the P-POTS proposal, with importance
weight) and one z_t (`objective.mask_pairs=mirror`: twice, from complementary uniforms; `score_baseline=two_draw`:
twice, from independent uniforms), run the denoiser once, and weight the per-token NLL of masked positions.
Learned schedules also get a score-function gradient for the discrete masking (RLOO, time-binned or the other
draw as baseline), so their parameters see the whole gradient of the NELBO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from data_pipeline.shard_format import PADDING_DOCUMENT_ID
from mdm_scale.config import ESTIMATORS, ObjectiveConfig
from mdm_scale.denoiser import Denoiser, document_attention_mask
from mdm_scale.schedules import Masking, Schedule
from mdm_scale.schedules.base import order_masking
from mdm_scale.schedules.block import BlockSchedule
from mdm_scale.schedules.lomdm import StateDependentSchedule
from mdm_scale.time_sampling import TimeSampler


@dataclass
class NelboTerms:
    loss: Tensor
    """Scalar to backpropagate: the per-token NELBO estimate plus a zero-valued score-function surrogate."""
    nelbo: Tensor
    """Scalar per-token NELBO estimate (detached): sum over positions / number of tokens, as MDLM reduces."""
    per_sequence: Tensor
    """[b] per-sequence NELBO estimate (sum over positions, detached)."""
    reconstruction: Tensor
    """Scalar per-token reconstruction part (detached)."""
    velocity: Tensor
    """Scalar per-token velocity-matching part (detached; 0 unless LoMDM)."""
    masked_fraction: Tensor
    t: Tensor
    """[b] the rows' times and [b] importance weights (for the time sampler's statistics)."""
    t_weight: Tensor
    token_square: Tensor
    """[b] sum over positions of the squared per-position terms (detached; P-POTS's `token` statistic)."""


class BatchError(ValueError):
    """A batch or noise the NELBO cannot be computed for (empty, token ids out of range, times outside (0, 1])."""


def check_batch(x0: Tensor, t: Tensor, vocab_size: int) -> None:
    """Raise BatchError unless x0 is a non-empty [b, l] batch of ids in [0, vocab_size) (the mask id vocab_size is
    the forward process's, never data) and every t is in (0, 1]: either would give a plausible wrong NELBO."""
    if x0.dim() != 2 or x0.numel() == 0:
        raise BatchError(f"the NELBO needs a non-empty [batch, length] batch of token ids; got shape {tuple(x0.shape)}")
    if t.shape != x0.shape[:1]:
        raise BatchError(f"one time per sequence expected: t has shape {tuple(t.shape)}, the batch {tuple(x0.shape)}")
    # One host sync for both checks.
    bad_tokens, bad_times = torch.stack([((x0 < 0) | (x0 >= vocab_size)).any(),
                                         ~((t > 0) & (t <= 1)).all()]).tolist()
    if bad_tokens:
        raise BatchError(f"token ids must be in [0, {vocab_size}) (the denoiser's vocabulary; {vocab_size} is the "
                         f"mask id); got min {int(x0.min())}, max {int(x0.max())}")
    if bad_times:
        raise BatchError(f"times must be in (0, 1]; got min {float(t.min())}, max {float(t.max())}")


def velocity_matching(velocity: Tensor, predicted: Tensor) -> Tensor:
    """A (log A - log A_hat) - (A - A_hat): >= 0 (log x <= x - 1), and exactly 0 where A_hat = A."""
    return velocity * (velocity.log() - predicted.log()) - (velocity - predicted)


def document_masks(document_ids: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Per-position document ids of packed sequences ([b, l], `--pack documents`) -> the attention mask
    [b, 1, l, l] (True = may not attend: another document) and the loss mask [b, l] (False at padding)."""
    if document_ids is None:
        return None, None
    return document_attention_mask(document_ids), document_ids != PADDING_DOCUMENT_ID




def draw_noise(batch_size: int, seq_len: int, sampler: TimeSampler, generator: torch.Generator,
               device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Times [b] (float64), their importance weights [b] and per-position uniforms [b, l] for the masks."""
    t, t_weight = sampler.draw(batch_size, generator)
    uniforms = torch.rand(batch_size, seq_len, generator=generator, dtype=torch.float64)
    return t.to(device), t_weight.to(device), uniforms.to(device)


@dataclass
class TrainingNoise:
    """This rank's rows of one micro-batch's noise, after the mask pairing (what `nelbo` consumes)."""

    t: Tensor
    t_weight: Tensor
    uniforms: Tensor
    mirrored: bool
    """Rows are [b sequences; the same b sequences] with uniforms [u; 1 - u] (see `mirror_rows`)."""
    baseline: Tensor | None
    """Score-function baseline per row from earlier steps (`time_binned`), or None (RLOO or two_draw)."""
    two_draw: bool = False
    """Rows are [b sequences; the same b sequences] at the same times with independent uniforms [u; u'], and each
    row's score-function baseline is its partner's loss (`score_baseline=two_draw`, the paper's Eq. 8)."""

    @property
    def paired(self) -> bool:
        """Every sequence is in the batch twice, rows i and i + b (MIRROR or two draws)."""
        return self.mirrored or self.two_draw

    def rows(self, x: Tensor | None) -> Tensor | None:
        """The batch's rows for this noise: tokens or document ids [b, ...], doubled when paired."""
        return mirror_rows(x) if self.paired else x


def training_noise(batch_size: int, seq_len: int, cfg: ObjectiveConfig, sampler: TimeSampler,
                   generator: torch.Generator, device: torch.device, *, data_parallel_rank: int = 0,
                   data_parallel_size: int = 1) -> TrainingNoise:
    """Noise of the global micro-batch (stratified over all of it), this rank's strided slice (the data loader's
    striding: DP = N sees exactly the noise of DP = 1), then the pairing (mirror, or two_draw: a second set of
    uniforms for the global batch, drawn after the first, so the first rows see the unpaired noise). The choices
    and their combinations were validated when `cfg` was built (ObjectiveConfig.__post_init__)."""
    two_draw = cfg.score_baseline == "two_draw"  # its pairing rules are checked when the config is built
    cpu = torch.device("cpu")  # the generator's device: draw there, copy only this rank's rows to `device`
    t, t_weight, uniforms = draw_noise(batch_size * data_parallel_size, seq_len, sampler, generator, cpu)
    mine = slice(data_parallel_rank, None, data_parallel_size)
    t, t_weight, uniforms = (x[mine].to(device) for x in (t, t_weight, uniforms))
    mirrored = cfg.mask_pairs == "mirror"
    if mirrored:
        t, t_weight, uniforms = mirror_rows(t), mirror_rows(t_weight), torch.cat([uniforms, 1 - uniforms])
    if two_draw:  # the second draw z_t' of each sequence: same t, independent mask
        second = torch.rand(batch_size * data_parallel_size, seq_len, generator=generator, dtype=torch.float64)
        t, t_weight, uniforms = mirror_rows(t), mirror_rows(t_weight), torch.cat([uniforms, second[mine].to(device)])
    baseline = sampler.baseline(t, t_weight) if cfg.score_baseline == "time_binned" else None
    return TrainingNoise(t, t_weight, uniforms, mirrored, baseline, two_draw)


def mirror_rows(x: Tensor | None) -> Tensor | None:
    """[b, ...] -> [2b, ...]: every sequence twice (a pair's rows are i and i + b: MIRROR, two draws)."""
    return None if x is None else torch.cat([x, x])


@dataclass
class NoisedBatch:
    """A batch after the forward process at its times: what the denoiser sees and what weights its loss."""

    x0: Tensor
    t: Tensor
    """[b] the times the denoiser sees (float64)."""
    t_weight: Tensor
    masking: Masking
    masked: Tensor
    """[b, l] bool: z_t^i = m."""
    z_t: Tensor


def apply_noise(denoiser: Denoiser, schedule: Schedule, x0: Tensor, t: Tensor, t_weight: Tensor, uniforms: Tensor,
                forward_logits: Tensor | None = None, estimator: str = "time") -> NoisedBatch:
    """Mask x0. Time form: at times t, z_t^i = m iff u_i < 1 - alpha_i(t). Order form: t is the step fraction
    and the same uniforms race to a generation order (`schedules.base.order_masking`); the batch's t becomes the
    time of the next reveal. `forward_logits` are LoMDM's forward-scheduler logits (their gradients reach phi
    through the weights and log-probabilities of the masking).

    A causal denoiser (objective.causal) reads position i's slice of the left-to-right order, z_t = (x^(<i), m...),
    from x0 itself: its output i sees only x^(<i). So every position is the active one at once, with weight 1: the
    Rao-Blackwellised estimator averaged over all L slices (K NLL_i / K each), exactly the causal NLL."""
    if denoiser.causal:
        if not isinstance(schedule, BlockSchedule) or schedule.block_size != 1 or schedule.reverse \
                or schedule.order is not None:
            raise ValueError("a causal denoiser needs the left_to_right schedule (objective.causal)")
        ones = torch.ones(x0.shape, dtype=torch.float32, device=x0.device)
        masking = Masking(mask_prob=ones, weight=ones)
        return NoisedBatch(x0, torch.ones_like(t), torch.ones_like(t_weight), masking, ones.bool(), x0)
    if estimator == "order":
        masking = order_masking(schedule.polynomial_exponents(x0.shape[1], forward_logits), t, uniforms)
        masked, t = masking.masked, masking.time
    elif estimator == "time":
        masking = schedule.masking(t, x0.shape[1], forward_logits)
        masked = uniforms < masking.mask_prob  # [b, l]
    else:
        raise ValueError(f"objective.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    z_t = torch.where(masked, torch.full_like(x0, denoiser.mask_id), x0)
    return NoisedBatch(x0, t, t_weight, masking, masked, z_t)


def nelbo_from_features(denoiser: Denoiser, schedule: Schedule, noised: NoisedBatch, hidden: Tensor, *,
                        velocity_weight: float = 1.0, score_function: bool = True, reduce_group=None,
                        loss_mask: Tensor | None = None, mirrored: bool = False,
                        baseline: Tensor | None = None, two_draw: bool = False,
                        attention_mask: Tensor | None = None) -> NelboTerms:
    """The weighted loss from the denoiser's features of z_t (the last pipeline stage's job).

    Args:
        hidden: [b, l, h] final-norm features of noised.z_t.
        velocity_weight, score_function, reduce_group: as in `nelbo`.
        loss_mask: [b, l] bool, False at positions that are not data (packing's padding): they carry no loss,
            no score-function term and do not count as tokens. None = every position counts.
        mirrored: rows i and i + b/2 are a MIRROR pair (complementary masks): the RLOO baseline of a row leaves
            out both, since the partner's loss depends on this row's mask.
        baseline: [b] score-function baseline from earlier steps (time_binned); None = RLOO over the batch.
        two_draw: rows i and i + b/2 are two independent draws of one sequence at one t: each row's baseline is its
            partner's loss, so a pair's surrogate is (L_1 - L_2) (log q(z_1) - log q(z_2)), the paper's Eq. 8.
        attention_mask: [b, 1, l, l] as in the denoiser's forward (document boundaries), for the backward
            scheduler's transformer layers.
    """
    x0, t, masking = noised.x0, noised.t, noised.masking
    masked = noised.masked if loss_mask is None else noised.masked & loss_mask
    b, l = x0.shape
    # Weight: A_i(t) at masked positions, times the importance weight of t.
    weight = (masking.weight * noised.t_weight[:, None]).to(torch.float32)  # [b, l]
    # SUBS: unmasked positions copy their input, so only masked positions need logits, and of those only the ones
    # with a nonzero weight (AR / block schedules weight just the positions of the active slice: this skips the
    # head for the rest); the fused head returns sum_i weight_i NLL_i (gradients for features, head and weights)
    # and the per-position NLL.
    rows = (masked & (weight != 0)).nonzero(as_tuple=True)
    weighted_sum, nll = denoiser.weighted_nll(hidden[rows], x0[rows], weight[rows])
    terms = weight[rows].detach() * nll
    reconstruction = torch.zeros(b, dtype=torch.float32, device=x0.device).index_add_(0, rows[0], terms)  # [b]
    token_square = torch.zeros(b, dtype=torch.float64, device=x0.device).index_add_(
        0, rows[0], terms.double().square())
    velocity = torch.zeros_like(reconstruction)
    if isinstance(schedule, StateDependentSchedule):
        w = masking.exponents  # [b, l]
        w_hat = schedule.backward_exponents(denoiser.scheduler_logits("backward_scheduler", hidden, attention_mask))
        # A = w / t and A_hat = w_hat / t share the 1/t factor (order form: L / W(M)), part of the weight.
        rate = masking.rate_scale if masking.rate_scale is not None else 1 / t[:, None]
        scale = (noised.t_weight[:, None] * rate).to(torch.float32)
        per_position = masked * scale * velocity_matching(w.to(torch.float32), w_hat)
        velocity = per_position.sum(-1)
        token_square = token_square + (velocity_weight * per_position.detach().double()).square().sum(-1)
    per_sequence = reconstruction + velocity_weight * velocity.detach()  # [b], detached

    # Normalise per token (MDLM: over all tokens, masked or not).
    num_tokens = b * l if loss_mask is None else loss_mask.sum().clamp_min(1)
    value = per_sequence.sum() / num_tokens
    loss = (weighted_sum + velocity_weight * velocity.sum()) / num_tokens
    if schedule.learned and score_function:
        if masking.log_prob is not None:  # order form: log P(the revealed prefix of the order)
            log_q = masking.log_prob
        else:
            log_q = torch.where(masked, masking.log_mask_prob, masking.log_keep_prob)
            log_q = (log_q if loss_mask is None else log_q * loss_mask).sum(-1)  # [b]
        reward = per_sequence.to(torch.float64)
        if two_draw:
            baseline = reward.view(2, -1).flip(0).reshape(-1)  # [b] the partner's loss: same x and t, own mask
        elif baseline is None:
            baseline = leave_one_out_baseline(reward, mirrored, reduce_group)
        surrogate = ((reward - baseline) * (log_q - log_q.detach())).sum() / num_tokens
        loss = loss + surrogate.to(loss.dtype)
    return NelboTerms(
        loss=loss,
        nelbo=value,
        per_sequence=per_sequence,
        reconstruction=reconstruction.sum() / num_tokens,
        velocity=velocity.detach().sum() / num_tokens,
        masked_fraction=masked.float().mean(),
        t=t.detach(),
        t_weight=noised.t_weight.detach(),
        token_square=token_square,
    )


def leave_one_out_baseline(reward: Tensor, mirrored: bool, reduce_group=None) -> Tensor:
    """RLOO: each row's baseline is the mean reward of the other sequences of the (global) batch, independent of
    this row's mask given its t. A MIRROR pair is one unit (its rows' masks are dependent)."""
    unit = reward.view(2, -1).sum(0).repeat(2) if mirrored else reward  # per row: its pair's (or its own) reward
    unit_size = 2 if mirrored else 1
    totals = torch.stack([reward.sum(), torch.tensor(float(len(reward)), dtype=torch.float64, device=reward.device)])
    if reduce_group is not None:
        torch.distributed.all_reduce(totals, group=reduce_group)
    if totals[1] < 2 * unit_size:
        raise ValueError("learned schedules need >= 2 sequences per batch for the RLOO baseline")
    return (totals[0] - unit) / (totals[1] - unit_size)


def nelbo(
    denoiser: Denoiser,
    schedule: Schedule,
    x0: Tensor,
    t: Tensor,
    t_weight: Tensor,
    uniforms: Tensor,
    *,
    velocity_weight: float = 1.0,
    score_function: bool = True,
    reduce_group=None,
    document_ids: Tensor | None = None,
    mirrored: bool = False,
    baseline: Tensor | None = None,
    estimator: str = "time",
    two_draw: bool = False,
) -> NelboTerms:
    """Single-sample NELBO estimate at the given noise (all passes on this process; see pipeline.py for PP).

    Args:
        x0: [b, l] clean token ids.
        t: [b] float64 times; t_weight: [b] importance weights of those times.
        uniforms: [b, l] float64 in [0, 1): position i is masked iff uniforms < 1 - alpha_i(t).
        velocity_weight: weight of LoMDM's velocity-matching term (1 = the NELBO).
        score_function: add the RLOO score-function surrogate for learned schedules.
        reduce_group: data-parallel group; the RLOO baseline then averages over the global batch.
        document_ids: [b, l] document of each position (`--pack documents`): attention stays within a document
            and padding carries no loss. None = one sequence per row, every position counts.
        mirrored, baseline, two_draw: the score-function baseline's inputs (see `nelbo_from_features`); with
            either pairing the rows are [x; x], so the clean pass runs on the first half only.
        estimator: time | order (then t is the step fraction; see `apply_noise`).
    """
    check_batch(x0, t, denoiser.vocab_size)
    attention_mask, loss_mask = document_masks(document_ids)
    # 1. Forward scheduler (LoMDM): exponents from clean-x features; no gradient into the backbone. A pair's two
    #    rows hold the same sequence: one clean pass and one scheduler call per sequence.
    forward_logits = None
    if schedule.needs_clean_features:
        clean = slice(0, x0.shape[0] // 2 if mirrored or two_draw else None)
        clean_mask = None if attention_mask is None else attention_mask[clean]
        with torch.no_grad():
            clean_hidden = denoiser(x0[clean], torch.zeros_like(t[clean]), clean_mask)
        forward_logits = denoiser.scheduler_logits("forward_scheduler", clean_hidden, clean_mask)  # [b(/2), l]
        if mirrored or two_draw:
            forward_logits = mirror_rows(forward_logits)  # [b, l]
    # 2. Mask.
    noised = apply_noise(denoiser, schedule, x0, t, t_weight, uniforms, forward_logits, estimator)
    # 3. Denoise: one pass over z_t.
    hidden = denoiser(noised.z_t, noised.t.float(), attention_mask)  # [b, l, h]
    # 4.-5. Weight and normalise.
    return nelbo_from_features(denoiser, schedule, noised, hidden, velocity_weight=velocity_weight,
                               score_function=score_function, reduce_group=reduce_group, loss_mask=loss_mask,
                               mirrored=mirrored, baseline=baseline, two_draw=two_draw,
                               attention_mask=attention_mask)


def training_nelbo(
    denoiser: Denoiser, schedule: Schedule, x0: Tensor, cfg: ObjectiveConfig, generator: torch.Generator,
    *, sampler: TimeSampler | None = None, data_parallel_rank: int = 0, data_parallel_size: int = 1,
    data_parallel_group=None, document_ids: Tensor | None = None,
) -> NelboTerms:
    """Estimate the NELBO of a batch (the training objective) with noise drawn from `generator`.

    `sampler` is the run's time sampler (its P-POTS proposal / statistics); None = a fresh one from `cfg`.
    Every data-parallel rank draws the noise of the global batch and keeps its own strided slice. With
    `mask_pairs=mirror` the batch is doubled: [x; x] with uniforms [u; 1 - u] (a pair is two rows); with
    `score_baseline=two_draw` likewise, with independent uniforms [u; u'] at the same times.
    """
    b, l = x0.shape
    sampler = sampler or TimeSampler.from_config(cfg)
    noise = training_noise(b, l, cfg, sampler, generator, x0.device, data_parallel_rank=data_parallel_rank,
                           data_parallel_size=data_parallel_size)
    return nelbo(
        denoiser, schedule, noise.rows(x0), noise.t, noise.t_weight, noise.uniforms,
        velocity_weight=cfg.velocity_weight, score_function=cfg.score_function,
        reduce_group=data_parallel_group if data_parallel_size > 1 else None, document_ids=noise.rows(document_ids),
        mirrored=noise.mirrored, baseline=noise.baseline, estimator=cfg.estimator, two_draw=noise.two_draw,
    )
