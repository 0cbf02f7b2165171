"""Fixed multivariate schedules: blocks revealed in order (block diffusion), left-to-right, right-to-left and any
fixed generation order (a permutation of the positions, block size 1).

K = ceil(L / B) blocks; block k (counted in generation order) owns the time slice [1 - (k+1)/K, 1 - k/K]: before
it (smaller t) the block is clean, after it masked, and inside it follows the inner univariate schedule at local
time s = K t - (K - 1 - k). Its velocity is K * A_inner(s) inside the slice and 0 outside, so masked positions of
later blocks carry no loss at t.

Block size 1 (left-to-right = autoregressive): the active position's own mask decides no other term (earlier
positions are clean, later ones have zero velocity), so we Rao-Blackwellise it: the active position is always
masked with weight K, its reveal density. The estimator is then exactly K * NLL of one position; averaged over
the K slices it is the causal AR NLL (tests/mdm_scale/test_objective.py checks this to 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mdm_scale.schedules.base import Masking, Schedule
from mdm_scale.schedules.univariate import UnivariateSchedule


class BlockSchedule(Schedule):
    """Args:
    block_size: positions per block (1 = a deterministic order).
    inner: univariate schedule inside a block; its eps is forced to 0 so later blocks are fully masked.
    reverse: reveal blocks right to left.
    order: positions in generation order (0-based, a permutation of range(L)); needs block_size 1.
    """

    def __init__(self, block_size: int, inner: str = "loglinear", exponent: float = 1.0, reverse: bool = False,
                 order: Sequence[int] | None = None):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if order is not None and (block_size != 1 or sorted(order) != list(range(len(order)))):
            raise ValueError(f"a fixed order needs block size 1 and a permutation of 0..L-1, got {list(order)}")
        self.block_size, self.reverse = block_size, reverse
        self.order = None if order is None else [int(i) for i in order]
        self.inner = UnivariateSchedule(inner, eps=0.0, exponent=exponent)

    def _local_time(self, t: Tensor, seq_len: int) -> tuple[Tensor, int]:
        """[b] t -> ([b, l] unclamped local time of each position's block, K)."""
        num_blocks = math.ceil(seq_len / self.block_size)
        pos = torch.arange(seq_len, device=t.device)
        if self.order is not None:  # pos becomes each position's step in the order
            if len(self.order) != seq_len:
                raise ValueError(f"schedule.order has {len(self.order)} positions, the sequences {seq_len}")
            pos = torch.empty_like(pos).scatter_(0, torch.tensor(self.order, device=t.device), pos.clone())
        elif self.reverse:
            pos = seq_len - 1 - pos
        block = (pos // self.block_size).to(torch.float64)  # [l], 0 = revealed first
        local = num_blocks * t.to(torch.float64)[:, None] - (num_blocks - 1 - block)[None, :]  # [b, l]
        return local, num_blocks

    def masking(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Masking:
        local, num_blocks = self._local_time(t, seq_len)
        active = (local > 0) & (local <= 1)
        later = local > 1
        if self.block_size == 1:  # Rao-Blackwellised: active position always masked, weight K
            mask_prob = (active | later).to(torch.float64)
            weight = active.to(torch.float64) * num_blocks
            return Masking(mask_prob, weight)
        s = local.clamp(0.0, 1.0)
        p, a = self.inner.mask_prob_and_velocity(s.flatten())
        p, a = p.view_as(s), a.view_as(s)
        mask_prob = torch.where(later, torch.ones_like(p), torch.where(active, p, torch.zeros_like(p)))
        weight = torch.where(active, num_blocks * a, torch.zeros_like(a))
        return Masking(mask_prob, weight)

    def alpha(self, t: Tensor, seq_len: int, scheduler_logits: Tensor | None = None) -> Tensor:
        local, _ = self._local_time(t, seq_len)
        s = local.clamp(0.0, 1.0)
        if self.block_size == 1:  # uniform reveal time inside the slice
            return 1 - s
        return 1 - self.inner.mask_prob_and_velocity(s.flatten())[0].view_as(s)
