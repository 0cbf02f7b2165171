"""Exactly resumable batches of fixed-length samples, in memory (`PackedBatches`) or from shards (shards.py).

`EpochBatches` owns the order (a per-(seed, epoch) permutation, strided over data-parallel ranks) and the resume
state for any random-access `SampleSource`. `PackedBatches` is its in-memory source: like MDLM's OpenWebText setup, documents (already separated by EOS) are concatenated and cut into consecutive,
non-overlapping `seq_len` windows, so no padding is ever trained on. The visiting order of the windows is a pure
function of (seed, epoch), which is what makes resuming exact: the iterator's whole state is two integers.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Protocol

import numpy as np
import torch

_STATE_CONFIG_KEYS = ("seq_len", "batch_size", "num_samples", "world_size", "seed", "shuffle")


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed per (seed, epoch); hashing keeps nearby seeds/epochs from giving related streams."""
    digest = hashlib.sha256(f"packed-batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampleSource(Protocol):
    """Random access to fixed-length samples by global index (in-memory windows, MDS or tar shards)."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> np.ndarray:
        """[n] global indices -> [n, seq_len] integer array."""
        ...


class EpochBatches:
    """Iterator of `torch.LongTensor` batches `[batch_size, seq_len]` over the samples of a `SampleSource`.

    Every epoch visits all samples in a permutation seeded by (seed, epoch). With `world_size > 1` each rank takes
    a disjoint strided slice of that permutation (`perm[rank::world_size]`) after the tail that does not fill a
    whole batch on every rank is dropped, so all ranks yield the same number of batches.

    `shuffle=True` (training) iterates forever across epochs; `shuffle=False` (evaluation) keeps the stored order
    and stops after one pass. `state_dict()` is identical on every rank, so rank 0 can save it.
    """

    def __init__(self, source: SampleSource, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0) -> None:
        """Args:
        source: the samples (`len(source)` of them).
        seq_len: tokens per sample (row).
        batch_size: samples per batch, per rank.
        seed: base seed of the per-epoch permutations.
        shuffle: permute samples each epoch and iterate forever; False keeps order and stops after one pass.
        rank: this process's index in [0, world_size).
        world_size: number of data-parallel ranks sharing the samples.
        num_workers: DataLoader worker processes that read batches ahead (0 = read in this process). A batch is a
            pure function of its index, so workers change neither the order nor the resume state.
        """
        if seq_len < 1 or batch_size < 1 or world_size < 1:
            raise ValueError(f"seq_len, batch_size, world_size must be >= 1, got {seq_len}, {batch_size}, {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.source = source
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self._num_samples = len(source)
        self._batches_per_epoch = self._num_samples // self.world_size // self.batch_size
        if self._batches_per_epoch == 0:
            raise ValueError(self._too_short_message())
        self._epoch = 0
        self._position = 0  # batches already yielded in the current epoch
        self._order_epoch = -1
        self._order: torch.Tensor | None = None  # this rank's sample indices for `_order_epoch`
        self.num_workers = int(num_workers)
        self._prefetch = None  # DataLoader iterator, started at the current position on first use

    def _too_short_message(self) -> str:
        return (f"{self._num_samples} samples, but one batch on each of {self.world_size} rank(s) needs "
                f"{self.batch_size * self.world_size}")

    @property
    def num_samples(self) -> int:
        return self._num_samples

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch."""
        return self._batches_per_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`, in visiting order (`batches_per_epoch * batch_size` of them).

        Args:
            epoch: epoch number (>= 0).
        """
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self._num_samples, generator=generator)
        else:
            perm = torch.arange(self._num_samples)
        used = perm[: self._batches_per_epoch * self.batch_size * self.world_size]
        return used[self.rank :: self.world_size]

    def __iter__(self) -> EpochBatches:
        return self

    def batch(self, index: int) -> torch.Tensor:
        """This rank's `index`-th batch counted from the start of epoch 0: `[batch_size, seq_len]` int64."""
        epoch, position = divmod(index, self._batches_per_epoch)
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        start = position * self.batch_size
        idx = self._order[start : start + self.batch_size].numpy()
        return torch.from_numpy(np.asarray(self.source.get(idx)).astype(np.int64))

    def __next__(self) -> torch.Tensor:
        if not self.shuffle and self._epoch >= 1:
            raise StopIteration
        index = self._epoch * self._batches_per_epoch + self._position
        if self.num_workers == 0:
            batch = self.batch(index)
        else:
            if self._prefetch is None:
                end = None if self.shuffle else self._batches_per_epoch
                indices = itertools.count(index) if end is None else range(index, end)
                self._prefetch = iter(torch.utils.data.DataLoader(
                    _BatchByIndex(self), batch_size=None, sampler=indices, num_workers=self.num_workers))
            batch = next(self._prefetch)
        self._position += 1
        if self._position == self._batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        """Position of the iterator (epoch, batches into it) plus the configuration it is only valid for."""
        return {"epoch": self._epoch, "position": self._position, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "num_samples": self._num_samples, "world_size": self.world_size,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state`: the next batches are those the saving iterator would have produced next.

        Args:
            state: a `state_dict()` result (e.g. from a checkpoint), possibly saved by another rank.

        Raises:
            ValueError: the state was made with a different seq_len, batch_size, num_samples, world_size, seed
                or shuffle, or its position is out of range.
        """
        name = type(self).__name__
        missing = [k for k in ("epoch", "position", *_STATE_CONFIG_KEYS) if k not in state]
        if missing:
            raise ValueError(f"{name} state is missing {missing}")
        current = self.state_dict()
        diffs = [f"{k}: saved {state[k]!r}, now {current[k]!r}" for k in _STATE_CONFIG_KEYS if state[k] != current[k]]
        if diffs:
            raise ValueError(f"{name} state was saved with a different configuration (" + "; ".join(diffs)
                             + "); resuming would not reproduce the uninterrupted stream")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self._batches_per_epoch:
            raise ValueError(f"{name} state position out of range: epoch {epoch}, position {position} "
                             f"(batches_per_epoch {self._batches_per_epoch})")
        self._epoch, self._position = epoch, position
        self._prefetch = None  # restart the workers at the loaded position


class _BatchByIndex(torch.utils.data.Dataset):
    """Map-style view of an `EpochBatches` for DataLoader workers: item k is its k-th batch."""

    def __init__(self, batches: EpochBatches):
        self.batches = batches

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.batches.batch(index)


class _Windows:
    """Consecutive non-overlapping `seq_len` windows of a 1-D token stream (the partial tail is dropped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        num = len(tokens) // seq_len
        self.rows = tokens[: num * seq_len].reshape(num, seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.rows[indices]


class PackedBatches(EpochBatches):
    """`EpochBatches` over the windows of one in-memory token stream ("wrap" packing, as MDLM does for OWT)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0) -> None:
        """Args:
        tokens: 1-D integer token stream (e.g. from `build_token_corpus`); may be a memmap, it is not copied.
        seq_len, batch_size, seed, shuffle, rank, world_size, num_workers: as in `EpochBatches`.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self._num_tokens = len(tokens)
        super().__init__(_Windows(tokens, seq_len), seq_len, batch_size, seed, shuffle, rank, world_size, num_workers)

    def _too_short_message(self) -> str:
        need = self.seq_len * self.batch_size * self.world_size
        return (f"token array too short: {self._num_tokens} tokens make {self._num_samples} windows of "
                f"{self.seq_len}, but one batch on each of {self.world_size} rank(s) needs "
                f"{self.batch_size * self.world_size} windows ({need} tokens)")

    @property
    def num_windows(self) -> int:
        """Number of full `seq_len` windows in the stream."""
        return self._num_samples
