"""Exactly resumable batches of fixed-length windows cut from one token stream ("wrap" packing).

Like MDLM's OpenWebText setup, documents (already separated by EOS) are concatenated and cut into consecutive,
non-overlapping `seq_len` windows, so no padding is ever trained on. The visiting order of the windows is a pure
function of (seed, epoch), which is what makes resuming exact: the iterator's whole state is two integers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_STATE_CONFIG_KEYS = ("seq_len", "batch_size", "num_windows", "world_size", "seed", "shuffle")


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed per (seed, epoch); hashing keeps nearby seeds/epochs from giving related streams."""
    digest = hashlib.sha256(f"packed-batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class PackedBatches:
    """Iterator of `torch.LongTensor` batches `[batch_size, seq_len]` over windows of a 1-D token array.

    Every epoch visits all `num_windows` windows in a permutation seeded by (seed, epoch). With `world_size > 1`
    each rank takes a disjoint strided slice of that permutation (`perm[rank::world_size]`) after the tail that
    does not fill a whole batch on every rank is dropped, so all ranks yield the same number of batches.

    `shuffle=True` (training) iterates forever across epochs; `shuffle=False` (evaluation) keeps the windows in
    stream order and stops after one pass. `state_dict()` is identical on every rank, so rank 0 can save it.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        """Args:
        tokens: 1-D integer token stream (e.g. from `build_token_corpus`); may be a memmap, it is not copied.
        seq_len: tokens per window (row).
        batch_size: windows per batch, per rank.
        seed: base seed of the per-epoch permutations.
        shuffle: permute windows each epoch and iterate forever; False keeps order and stops after one pass.
        rank: this process's index in [0, world_size).
        world_size: number of data-parallel ranks sharing the stream.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if seq_len < 1 or batch_size < 1 or world_size < 1:
            raise ValueError(f"seq_len, batch_size, world_size must be >= 1, got {seq_len}, {batch_size}, {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self._num_windows = len(tokens) // self.seq_len
        self._batches_per_epoch = self._num_windows // self.world_size // self.batch_size
        if self._batches_per_epoch == 0:
            need = self.seq_len * self.batch_size * self.world_size
            raise ValueError(
                f"token array too short: {len(tokens)} tokens make {self._num_windows} windows of {self.seq_len}, "
                f"but one batch on each of {self.world_size} rank(s) needs {self.batch_size * self.world_size} "
                f"windows ({need} tokens)")
        self._windows = tokens[: self._num_windows * self.seq_len].reshape(self._num_windows, self.seq_len)
        self._epoch = 0
        self._position = 0  # batches already yielded in the current epoch
        self._order_epoch = -1
        self._order: torch.Tensor | None = None  # this rank's window indices for `_order_epoch`

    @property
    def num_windows(self) -> int:
        """Number of full `seq_len` windows in the stream (the partial tail is dropped)."""
        return self._num_windows

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch."""
        return self._batches_per_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's window indices for `epoch`, in visiting order (`batches_per_epoch * batch_size` of them).

        Args:
            epoch: epoch number (>= 0).
        """
        if self.shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            perm = torch.randperm(self._num_windows, generator=generator)
        else:
            perm = torch.arange(self._num_windows)
        used = perm[: self._batches_per_epoch * self.batch_size * self.world_size]
        return used[self.rank :: self.world_size]

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if not self.shuffle and self._epoch >= 1:
            raise StopIteration
        if self._order_epoch != self._epoch:
            self._order, self._order_epoch = self.epoch_order(self._epoch), self._epoch
        start = self._position * self.batch_size
        idx = self._order[start : start + self.batch_size].numpy()
        batch = torch.from_numpy(self._windows[idx].astype(np.int64))
        self._position += 1
        if self._position == self._batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        """Position of the iterator (epoch, batches into it) plus the configuration it is only valid for."""
        return {"epoch": self._epoch, "position": self._position, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "num_windows": self._num_windows, "world_size": self.world_size,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state`: the next batches are those the saving iterator would have produced next.

        Args:
            state: a `state_dict()` result (e.g. from a checkpoint), possibly saved by another rank.

        Raises:
            ValueError: the state was made with a different seq_len, batch_size, num_windows, world_size, seed
                or shuffle, or its position is out of range.
        """
        missing = [k for k in ("epoch", "position", *_STATE_CONFIG_KEYS) if k not in state]
        if missing:
            raise ValueError(f"PackedBatches state is missing {missing}")
        current = self.state_dict()
        diffs = [f"{k}: saved {state[k]!r}, now {current[k]!r}" for k in _STATE_CONFIG_KEYS if state[k] != current[k]]
        if diffs:
            raise ValueError("PackedBatches state was saved with a different configuration (" + "; ".join(diffs)
                             + "); resuming would not reproduce the uninterrupted stream")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self._batches_per_epoch:
            raise ValueError(f"PackedBatches state position out of range: epoch {epoch}, position {position} "
                             f"(batches_per_epoch {self._batches_per_epoch})")
        self._epoch, self._position = epoch, position
