"""Bytes one rank sends per optimizer step, per parallel dimension: the formulas bench/scaling.py prints for
candidate layouts and parallel/plan.py prints for the submitted one (one copy, so the two cannot disagree).

    DP  gradients, ring all-reduce (ZeRO 1/2: reduce-scatter + all-gather of the updated parameters, the same
        volume): 2 (DP-1)/DP * 4 bytes * params of this rank (fp32 gradients)
    TP  2 all-reduces of [s, b, h] activations per layer forward and 2 in backward (megatron's f/g operators),
        each 2 (TP-1)/TP * s b h * 2 bytes (bf16), per micro-batch; LoMDM's clean (no-grad) forward adds the 2
        forward ones. Sequence parallelism replaces each all-reduce by an all-gather + reduce-scatter: same bytes.
    PP  one [s, b, h] activation forward and one gradient back per stage boundary per micro-batch, in the
        pipeline dtype (fp32 here: mdm_scale/denoiser.py sets pipeline_dtype=float32), s / TP rows under
        sequence parallelism; LoMDM's forward-only clean pipeline pass adds one forward send.

Upper bounds on exposed time when divided by bandwidth: nothing here models overlap with compute.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepBytes:
    dp: float
    tp: float
    pp: float

    @property
    def total(self) -> float:
        return self.dp + self.tp + self.pp


def step_bytes(*, params: int, tp: int, pp: int, dp: int, layers: int, seq_len: int, micro_batch: int,
               hidden: int, micro_batches: int, clean_forward: bool = False, sequence_parallel: bool = False,
               pipeline_bytes: int = 4) -> StepBytes:
    """Bytes one rank sends in one optimizer step.

    Args:
        params: parameters held by this rank (its TP x PP shard).
        layers: transformer blocks of the whole model (each stage runs layers / pp of them).
        micro_batches: micro-batches this rank runs per optimizer step (gradient accumulation).
        clean_forward: LoMDM's extra no-grad forward over the clean sequence (objective lomdm / lomdm_paper).
        pipeline_bytes: bytes per element sent between pipeline stages.
    """
    act = seq_len * micro_batch * hidden  # elements of one [s, b, h] activation
    dp_bytes = 2 * (dp - 1) / dp * 4 * params
    collectives = (4 + (2 if clean_forward else 0)) * layers / pp  # all-reduces per micro-batch
    tp_bytes = collectives * 2 * (tp - 1) / tp * act * 2 * micro_batches if tp > 1 else 0.0
    sent = act / (tp if sequence_parallel else 1) * pipeline_bytes
    pp_bytes = (2 + (1 if clean_forward else 0)) * sent * micro_batches if pp > 1 else 0.0
    return StepBytes(dp_bytes, tp_bytes, pp_bytes)
