"""Exactly resumable batches of fixed-length samples, in memory (`PackedBatches`) or from shards (shard_reader.py).

`EpochBatches` owns the order (a per-(seed, epoch) permutation, strided over data-parallel ranks) and the resume
state for any random-access `SampleSource`. `PackedBatches` is its in-memory source: like MDLM's OpenWebText setup, documents (already separated by EOS) are concatenated and cut into consecutive,
non-overlapping `seq_len` windows, so no padding is ever trained on. The visiting order of the windows is a pure
function of (seed, epoch), which is what makes resuming exact: the iterator's whole state is two integers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

_STATE_CONFIG_KEYS = ("seq_len", "num_samples", "seed", "shuffle")
"""What a saved position is only valid for. The rank count and per-rank batch size are not among them: the
position is a count of *global* samples into the epoch's permutation, the same for any data-parallel layout."""


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed per (seed, epoch); hashing keeps nearby seeds/epochs from giving related streams."""
    digest = hashlib.sha256(f"packed-batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampleSource(Protocol):
    """Random access to fixed-length samples by global index (in-memory windows, MDS or tar shards)."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> np.ndarray:
        """[n] global indices -> [n, seq_len] (or [n, columns, seq_len]) integer array."""
        ...


class EpochBatches:
    """Iterator of `torch.LongTensor` batches `[batch_size, seq_len]` over the samples of a `SampleSource`.

    Every epoch visits the samples in a permutation of all of them seeded by (seed, epoch), one *global batch*
    (`batch_size * world_size` samples) per step: global batch k is `perm[k*G : (k+1)*G]` and rank r takes every
    `world_size`-th sample of it starting at r. The tail that does not fill a global batch is dropped, so all ranks
    yield the same number of batches. The union of the ranks' k-th batches therefore does not depend on the layout.

    The position is the number of global samples consumed in the current epoch. That makes resuming exact and
    *elastic*: a state saved with 2 ranks x 8 continues on 1 x 16 or 4 x 4 with exactly the same samples per step,
    and with any other global batch it continues with the rest of the same permutation (nothing repeated or
    skipped). `shuffle=True` (training) iterates forever across epochs; `shuffle=False` (evaluation) keeps the
    stored order and stops after one pass. `state_dict()` is identical on every rank, so rank 0 can save it.
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
            pure function of its (epoch, offset), so workers change neither the order nor the resume state.
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
        self._global_batch = self.batch_size * self.world_size
        self._batches_per_epoch = self._num_samples // self._global_batch
        if self._batches_per_epoch == 0:
            raise ValueError(self._too_short_message())
        self._epoch = 0
        self._offset = 0  # global samples consumed in the current epoch
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None  # the global permutation of `_perm_epoch`
        self.num_workers = int(num_workers)
        self._prefetch = None  # DataLoader iterator, started at the current position on first use

    def _too_short_message(self) -> str:
        return (f"{self._num_samples} samples, but one batch on each of {self.world_size} rank(s) needs "
                f"{self._global_batch}")

    @property
    def num_samples(self) -> int:
        return self._num_samples

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields in a whole epoch."""
        return self._batches_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The global visiting order of `epoch` (all `num_samples` indices; identical on every rank)."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
                self._perm = torch.randperm(self._num_samples, generator=generator)
            else:
                self._perm = torch.arange(self._num_samples)
            self._perm_epoch = epoch
        return self._perm

    def batch_at(self, epoch: int, offset: int) -> torch.Tensor:
        """This rank's batch of the global batch that starts `offset` samples into `epoch`'s permutation."""
        perm = self.permutation(epoch)
        idx = perm[offset + self.rank : offset + self._global_batch : self.world_size].numpy()
        return torch.from_numpy(np.asarray(self.source.get(idx)).astype(np.int64))

    def _next_position(self, epoch: int, offset: int) -> tuple[int, int]:
        offset += self._global_batch
        if offset + self._global_batch > self._num_samples:  # the tail does not fill a global batch
            return epoch + 1, 0
        return epoch, offset

    def _positions(self) -> Iterator[tuple[int, int]]:
        """(epoch, offset) of every batch from the current position on (one pass only when not shuffling)."""
        epoch, offset = self._epoch, self._offset
        while self.shuffle or epoch == 0:
            yield epoch, offset
            epoch, offset = self._next_position(epoch, offset)

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if not self.shuffle and self._epoch >= 1:
            raise StopIteration
        if self.num_workers == 0:
            batch = self.batch_at(self._epoch, self._offset)
        else:
            if self._prefetch is None:
                self._prefetch = iter(torch.utils.data.DataLoader(
                    _BatchAtPosition(self), batch_size=None, sampler=self._positions(), num_workers=self.num_workers))
            batch = next(self._prefetch)
        self._epoch, self._offset = self._next_position(self._epoch, self._offset)
        return batch

    def state_dict(self) -> dict:
        """Position (epoch, global samples consumed in it) plus what it is only valid for. `world_size` and
        `batch_size` are recorded for information; a different layout may resume from this state."""
        return {"epoch": self._epoch, "sample_offset": self._offset, "seq_len": self.seq_len,
                "num_samples": self._num_samples, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state`: the next samples are those the saving run would have consumed next.

        Args:
            state: a `state_dict()` result (e.g. from a checkpoint), possibly saved by another rank or by a run
                with another rank count or batch size.

        Raises:
            ValueError: the state was made with a different seq_len, num_samples, seed or shuffle, or its
                position is out of range.
        """
        name = type(self).__name__
        missing = [k for k in ("epoch", "sample_offset", *_STATE_CONFIG_KEYS) if k not in state]
        if missing:
            raise ValueError(f"{name} state is missing {missing}")
        current = self.state_dict()
        diffs = [f"{k}: saved {state[k]!r}, now {current[k]!r}" for k in _STATE_CONFIG_KEYS if state[k] != current[k]]
        if diffs:
            raise ValueError(f"{name} state was saved with a different configuration (" + "; ".join(diffs)
                             + "); resuming would not reproduce the uninterrupted stream")
        epoch, offset = int(state["epoch"]), int(state["sample_offset"])
        if epoch < 0 or not 0 <= offset < self._num_samples:
            raise ValueError(f"{name} state position out of range: epoch {epoch}, sample_offset {offset} "
                             f"(num_samples {self._num_samples})")
        if offset + self._global_batch > self._num_samples:  # a larger global batch no longer fits this epoch
            epoch, offset = epoch + 1, 0
        self._epoch, self._offset = epoch, offset
        self._prefetch = None  # restart the workers at the loaded position


class _BatchAtPosition(torch.utils.data.Dataset):
    """Map-style view of an `EpochBatches` for DataLoader workers: the key is an (epoch, offset) position."""

    def __init__(self, batches: EpochBatches):
        self.batches = batches

    def __getitem__(self, position: tuple[int, int]) -> torch.Tensor:
        return self.batches.batch_at(*position)


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
