"""PackedBatches: exact resume, disjoint ranks, seeded order, and loud failures on mismatched state."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from data_pipeline.packed import PackedBatches

SEQ = 8


def _stream(num_windows: int, tail: int = 3) -> np.ndarray:
    """Tokens 0..N-1, so a window's id is its first token // SEQ; `tail` extra tokens form a partial window."""
    return np.arange(num_windows * SEQ + tail, dtype=np.uint32)


def _window_ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] // SEQ).tolist()


def _take(it, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(it, n))


def test_batches_are_long_tensors_of_consecutive_windows():
    it = PackedBatches(_stream(20), SEQ, batch_size=4, seed=0)
    batch = next(it)
    assert batch.dtype == torch.long and batch.shape == (4, SEQ)
    assert torch.equal(batch - batch[:, :1], torch.arange(SEQ).expand(4, SEQ))  # each row is one contiguous window
    assert all(int(row[0]) % SEQ == 0 for row in batch)  # windows start on seq_len boundaries: non-overlapping


def test_eval_mode_visits_windows_in_order_once_and_stops():
    it = PackedBatches(_stream(10), SEQ, batch_size=3, seed=0, shuffle=False)
    assert (it.num_windows, it.batches_per_epoch) == (10, 3)
    batches = list(it)
    assert [w for b in batches for w in _window_ids(b)] == list(range(9))  # partial tail and 10th window dropped
    assert list(it) == []


def test_training_iterates_forever_and_each_epoch_is_a_permutation_of_all_windows():
    it = PackedBatches(_stream(12), SEQ, batch_size=4, seed=3)
    epochs = [sorted(w for b in _take(it, 3) for w in _window_ids(b)) for _ in range(4)]
    assert all(e == list(range(12)) for e in epochs)
    assert it.state_dict()["epoch"] == 4


def test_epochs_use_different_permutations():
    it = PackedBatches(_stream(64), SEQ, batch_size=8, seed=0)
    orders = [[w for b in _take(it, 8) for w in _window_ids(b)] for _ in range(3)]
    assert orders[0] != orders[1] != orders[2]


@pytest.mark.parametrize("k", [0, 1, 4, 5, 7, 13])  # 5 batches per epoch: 5 and 7 cross an epoch boundary
def test_resume_after_k_batches_equals_uninterrupted_stream(k):
    tokens = _stream(21)
    reference = _take(PackedBatches(tokens, SEQ, batch_size=4, seed=11), k + 9)

    first = PackedBatches(tokens, SEQ, batch_size=4, seed=11)
    assert first.batches_per_epoch == 5
    seen = _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint: plain ints only
    resumed = PackedBatches(tokens, SEQ, batch_size=4, seed=11)
    resumed.load_state_dict(state)
    continued = _take(resumed, 9)
    assert all(torch.equal(a, b) for a, b in zip(seen + continued, reference, strict=True))


def test_resume_in_eval_mode_finishes_the_pass():
    tokens = _stream(12)
    it = PackedBatches(tokens, SEQ, batch_size=2, seed=0, shuffle=False)
    _take(it, 4)
    resumed = PackedBatches(tokens, SEQ, batch_size=2, seed=0, shuffle=False)
    resumed.load_state_dict(it.state_dict())
    assert [_window_ids(b) for b in resumed] == [[8, 9], [10, 11]]


def test_ranks_are_disjoint_and_their_union_covers_the_epoch():
    world, batch = 4, 3
    tokens = _stream(world * batch * 5)  # divides exactly: nothing dropped
    per_rank = []
    for rank in range(world):
        it = PackedBatches(tokens, SEQ, batch_size=batch, seed=5, rank=rank, world_size=world)
        assert it.batches_per_epoch == 5
        per_rank.append([w for b in _take(it, it.batches_per_epoch) for w in _window_ids(b)])
    flat = [w for ids in per_rank for w in ids]
    assert len(flat) == len(set(flat)) == it.num_windows
    assert sorted(flat) == list(range(it.num_windows))


def test_ranks_drop_the_same_remainder_and_get_equal_batches():
    world, batch = 3, 4
    iters = [PackedBatches(_stream(50), SEQ, batch, seed=1, rank=r, world_size=world) for r in range(world)]
    assert {it.batches_per_epoch for it in iters} == {50 // world // batch}
    windows = [set(w for b in _take(it, it.batches_per_epoch) for w in _window_ids(b)) for it in iters]
    assert not (windows[0] & windows[1] or windows[0] & windows[2] or windows[1] & windows[2])
    assert 50 - sum(map(len, windows)) < world * batch


def test_same_seed_gives_same_stream_and_other_seed_differs():
    tokens = _stream(40)

    def ids(seed):
        return [_window_ids(b) for b in _take(PackedBatches(tokens, SEQ, 4, seed=seed), 25)]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


@pytest.mark.parametrize(
    "change",
    [dict(seq_len=4), dict(tokens=_stream(30)), dict(seed=1), dict(shuffle=False)],
    ids=lambda c: next(iter(c)),
)
def test_loading_state_from_a_different_configuration_raises(change):
    base = dict(tokens=_stream(24), seq_len=SEQ, batch_size=4, seed=0, shuffle=True, world_size=1)
    saved = PackedBatches(**base)
    next(saved)
    other = PackedBatches(**{**base, **change})
    with pytest.raises(ValueError, match="different configuration"):
        other.load_state_dict(saved.state_dict())


def test_out_of_range_or_incomplete_state_raises():
    it = PackedBatches(_stream(24), SEQ, 4, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        it.load_state_dict({**it.state_dict(), "sample_offset": it.num_samples})
    with pytest.raises(ValueError, match="missing"):
        it.load_state_dict({"epoch": 0, "position": 0})


def _global_steps(world: int, batch: int, state: dict | None, steps: int, tokens) -> list[list[int]]:
    """The sorted union over `world` ranks of each of the next `steps` batches (after loading `state`)."""
    iters = [PackedBatches(tokens, SEQ, batch, seed=9, rank=r, world_size=world) for r in range(world)]
    for it in iters:
        if state is not None:
            it.load_state_dict(state)
    return [sorted(w for it in iters for w in _window_ids(next(it))) for _ in range(steps)]


@pytest.mark.parametrize("world,batch", [(1, 8), (4, 2), (8, 1)])
def test_resume_on_another_rank_count_with_the_same_global_batch_sees_the_same_global_batches(world, batch):
    """Saved by 2 ranks x 4 after 3 steps, resumed by `world` ranks x `batch` (global batch 8 throughout): every
    later step consumes exactly the samples the uninterrupted 2-rank run consumes, across an epoch boundary."""
    tokens = _stream(60)  # 60 windows: 7 global batches of 8 per epoch, 4 dropped
    uninterrupted = _global_steps(2, 4, None, 12, tokens)
    saver = [PackedBatches(tokens, SEQ, 4, seed=9, rank=r, world_size=2) for r in range(2)]
    for it in saver:
        _take(it, 3)
    state = json.loads(json.dumps(saver[0].state_dict()))
    assert state == saver[1].state_dict() and state["sample_offset"] == 24
    assert _global_steps(world, batch, state, 9, tokens) == uninterrupted[3:]


def test_resume_with_another_global_batch_continues_the_same_permutation():
    """A different global batch (8 -> 5) cannot give the same steps, but it still consumes the rest of the epoch's
    permutation in order: nothing is repeated or skipped before the (smaller) dropped tail."""
    tokens = _stream(60)
    saver = PackedBatches(tokens, SEQ, 4, seed=9, rank=0, world_size=2)
    _take(saver, 2)  # 16 samples consumed
    resumed = PackedBatches(tokens, SEQ, 5, seed=9)
    resumed.load_state_dict(saver.state_dict())
    rest = [w for b in _take(resumed, 8) for w in _window_ids(b)]  # (60 - 16) // 5 = 8 batches finish the epoch
    assert rest == saver.permutation(0)[16:56].tolist()
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["sample_offset"] == 0


def test_too_short_token_array_raises():
    with pytest.raises(ValueError, match="too short"):
        PackedBatches(_stream(3), SEQ, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="too short"):
        PackedBatches(_stream(6), SEQ, batch_size=4, seed=0, rank=1, world_size=2)
