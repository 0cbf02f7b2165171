"""Model FLOPs per token: the one formula behind bench/step.py's MFU and the scaling planner's budgets.

    N        = L (4 h^2 + 2 h f) + h V              matmul weights: attention (qkv, out), MLP (f = FFN width), head
    F_row    = 6 N + 12 L h s                       forward + backward (2 + 4 FLOPs per weight), plus attention
                                                    scores and values (QK^T and AV, 2 * 2 * s * h per layer forward,
                                                    x3 with backward; full bidirectional attention)
    F_clean  = 2 (N - h V) + 4 L h s                LoMDM's no-grad clean pass through the blocks (no output head)
    F_sched  = 6 k (4 h^2 + 2 h f) + 12 k h s       k scheduler transformer layers (lomdm_paper: k = 1), trained,
               + 6 (h m + m)                        and the MLP h -> m -> 1 every scheduler ends in (m: head size)

L layers, h hidden, f FFN width, V the real vocabulary (the embedding lookup is not a matmul), s sequence length.
Per token of training data (`training_flops_per_token`): R F_row with R = 2 rows per sequence for paired objectives
(two_draw, mirror), + F_clean for schedules that read clean features, + (1 + R) F_sched (the forward scheduler on
the clean features, the backward one on every row). Not counted: norms, activations, softmax, rotary. The head is
counted densely at every position, as MDLM computes it. The scheduler MLP is small beside a wide model but not
beside a narrow one: 7.5 % of lomdm_paper's F at 1 x 32 (m = 128), 0.6 % at 5 x 320.
"""

from __future__ import annotations

from mdm_scale.config import RunConfig


def matmul_params(num_layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """N: weights used once per token in a matmul (attention, MLP, output head)."""
    return num_layers * (4 * hidden * hidden + 2 * hidden * ffn) + hidden * vocab


def non_embedding_params(num_layers: int, hidden: int, ffn: int) -> int:
    """N without the output head: the size a scaling law is written in (Kaplan et al.)."""
    return num_layers * (4 * hidden * hidden + 2 * hidden * ffn)


def flops_per_token(num_layers: int, hidden: int, ffn: int, vocab: int, seq_len: int, *, clean_pass: bool) -> float:
    """F_row (+ F_clean): one row's training FLOPs per token (the module docstring)."""
    n = matmul_params(num_layers, hidden, ffn, vocab)
    flops = 6 * n + 12 * num_layers * hidden * seq_len
    if clean_pass:
        flops += 2 * (n - hidden * vocab) + 4 * num_layers * hidden * seq_len
    return float(flops)


def training_flops_per_token(cfg: RunConfig, vocab: int) -> float:
    """FLOPs per token of training data for `cfg`'s model and objective (the module docstring)."""
    m, objective = cfg.model, cfg.objective
    h, s = m.hidden_size, cfg.data.seq_len
    f = m.ffn_hidden_size or 4 * h
    rows = 2 if objective.mask_pairs == "mirror" or objective.score_baseline == "two_draw" else 1
    clean = objective.schedule.kind == "lomdm"
    flops = rows * flops_per_token(m.num_layers, h, f, vocab, s, clean_pass=False)
    if clean:  # a LoMDM schedule: the clean pass, the forward scheduler on its features, the backward one per row
        flops += flops_per_token(m.num_layers, h, f, vocab, s, clean_pass=True) - flops_per_token(
            m.num_layers, h, f, vocab, s, clean_pass=False)
        k, head = objective.schedule.scheduler_layers, m.scheduler_head_size
        flops += (1 + rows) * (6 * k * (4 * h * h + 2 * h * f) + 12 * k * h * s + 6 * (h * head + head))
    return float(flops)
