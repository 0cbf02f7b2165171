"""Shards (MDS / WebDataset): exact round trip, disjoint ranks, exact resume, corruption and mismatch detection."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from data_pipeline import shard_writer
from data_pipeline.packed import PackedBatches
from data_pipeline.shard_check import ShardError, verify_shards
from data_pipeline.shard_reader import ShardedSequences
from data_pipeline.shard_writer import write_mds, write_webdataset

SEQ = 16
N = 300
FP = "tok-fingerprint-A"
WRITERS = {
    # Small shards so every test crosses shard boundaries (MDS: ~24 samples per file; tar: 37 per file).
    "mds": lambda seqs, out, **kw: write_mds(seqs, out, shard_size_bytes=1600, **kw),
    "webdataset": lambda seqs, out, **kw: write_webdataset(seqs, out, samples_per_shard=37, **kw),
}


def _sequences(n: int = N) -> np.ndarray:
    """Row i holds i*SEQ .. i*SEQ+SEQ-1 (sample id = first token // SEQ), plus large ids to catch truncation."""
    seqs = np.arange(n * SEQ, dtype=np.uint32).reshape(n, SEQ)
    seqs[:, -1] = np.uint32(2**32 - 1) - np.arange(n, dtype=np.uint32)
    return seqs


def _ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] // SEQ).tolist()


@pytest.fixture(scope="module", params=list(WRITERS))
def shard_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "shards"
    WRITERS[request.param](_sequences(), out, tokenizer_fingerprint=FP)
    return out


def _reader(path, **kw) -> ShardedSequences:
    args = dict(seq_len=SEQ, batch_size=8, seed=3)
    args.update(kw)
    return ShardedSequences(path, **args)


def test_round_trip_in_order_equals_input(shard_dir):
    it = _reader(shard_dir, batch_size=10, shuffle=False)  # 300 = 30 whole batches: nothing trimmed
    batches = list(it)
    assert all(b.dtype == torch.long and b.shape == (10, SEQ) for b in batches)
    assert torch.equal(torch.cat(batches), torch.from_numpy(_sequences().astype(np.int64)))
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert (manifest["num_samples"], manifest["seq_len"], manifest["dtype"]) == (N, SEQ, "uint32")
    assert manifest["tokenizer_fingerprint"] == FP and len(manifest["shards"]) > 3
    assert not [p for p in shard_dir.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away


def test_two_ranks_are_disjoint_and_cover_all_samples_in_one_epoch(shard_dir):
    per_rank = []
    for rank in range(2):
        it = _reader(shard_dir, batch_size=10, rank=rank, world_size=2)  # 300 = 2 ranks x 15 batches x 10
        per_rank.append([i for b in itertools.islice(it, it.batches_per_epoch) for i in _ids(b)])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(N))
    assert per_rank[0] != sorted(per_rank[0])  # shuffled


def test_order_matches_packed_batches_over_the_same_windows(shard_dir):
    stream = _sequences().reshape(-1)
    for rank in range(2):
        ref = PackedBatches(stream, SEQ, batch_size=7, seed=11, rank=rank, world_size=2)
        it = _reader(shard_dir, batch_size=7, seed=11, rank=rank, world_size=2)
        for a, b in zip(itertools.islice(ref, 50), itertools.islice(it, 50)):  # crosses 2 epochs (21 per epoch)
            assert torch.equal(a, b)


@pytest.mark.parametrize("k", [0, 5, 18, 40])
def test_resume_after_k_batches_gives_exactly_the_remaining_batches(shard_dir, k):
    uninterrupted = [b.clone() for b in itertools.islice(_reader(shard_dir), 45)]  # 37 per epoch: crosses one
    killed = _reader(shard_dir)
    for _ in range(k):
        next(killed)
    state = json.loads(json.dumps(killed.state_dict()))  # as through a checkpoint
    del killed
    resumed = _reader(shard_dir)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed, 45 - k))
    assert len(rest) == 45 - k and all(torch.equal(a, b) for a, b in zip(uninterrupted[k:], rest))


def test_state_from_another_configuration_is_refused(shard_dir):
    state = _reader(shard_dir).state_dict()
    with pytest.raises(ValueError, match=r"different configuration \(seed: saved 3, now 4\)"):
        _reader(shard_dir, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        _reader(shard_dir).load_state_dict({"epoch": 0})


def _copy(shard_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(shard_dir, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def test_flipped_byte_is_detected_naming_the_file(shard_dir, tmp_path):
    dst, manifest = _copy(shard_dir, tmp_path)
    victim = dst / manifest["shards"][2]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{victim.name}: corrupt"):
        verify_shards(dst)
    with pytest.raises(ShardError, match=rf"{victim.name}: corrupt"):
        _reader(dst)


def test_truncated_or_missing_shard_is_detected_naming_the_file(shard_dir, tmp_path):
    dst, manifest = _copy(shard_dir, tmp_path)
    victim = dst / manifest["shards"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:-5])
    with pytest.raises(ShardError, match=rf"{victim.name}: truncated"):
        _reader(dst)
    victim.unlink()
    with pytest.raises(ShardError, match=rf"{victim.name}: missing"):
        verify_shards(dst)
    (dst / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json: manifest missing"):
        verify_shards(dst)


def test_manifest_with_other_seq_len_or_fingerprint_is_refused(shard_dir):
    assert _reader(shard_dir, expected_tokenizer_fingerprint=FP).num_samples == N
    with pytest.raises(ShardError, match=r"manifest.json does not match.*seq_len: manifest 16, expected 32"):
        _reader(shard_dir, seq_len=32)
    with pytest.raises(ShardError, match=r"manifest.json does not match.*tokenizer_fingerprint: manifest "
                                         r"'tok-fingerprint-A', expected 'other'"):
        _reader(shard_dir, expected_tokenizer_fingerprint="other")


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_writing_is_atomic_and_never_clobbers(fmt, tmp_path, monkeypatch):
    out = tmp_path / "s"
    WRITERS[fmt](_sequences(40), out)
    with pytest.raises(FileExistsError):
        WRITERS[fmt](_sequences(40), out)
    def crash(path):
        raise OSError(f"disk full while hashing {path}")

    with monkeypatch.context() as m:  # fails after the shards are written: old directory untouched, no temp left
        m.setattr(shard_writer, "sha256_file", crash)
        with pytest.raises(OSError, match="disk full"):
            WRITERS[fmt](_sequences(50), out, overwrite=True)
    assert verify_shards(out)["num_samples"] == 40
    WRITERS[fmt](_sequences(50), out, overwrite=True)
    assert verify_shards(out)["num_samples"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_mds_shards_are_readable_by_streamings_own_dataset(tmp_path):
    from data_pipeline.streaming_compat import StreamingDataset

    out = WRITERS["mds"](_sequences(), tmp_path / "s")
    ds = StreamingDataset(local=str(out), remote=None, shuffle=False, batch_size=4)
    assert len(ds) == N
    assert np.array_equal(np.stack([ds[i]["tokens"] for i in range(N)]), _sequences())


def test_torchvision_standin_is_used_only_when_real_torchvision_cannot_import():
    import subprocess
    import sys

    from data_pipeline import streaming_compat

    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    assert streaming_compat.USING_TORCHVISION_STANDIN == (probe.returncode != 0)
    if streaming_compat.USING_TORCHVISION_STANDIN:
        # the only failures the stand-in is meant for: the CUDA wheel beside CPU torch, or no torchvision at all
        assert ("torchvision::nms does not exist" in probe.stderr
                or "No module named 'torchvision'" in probe.stderr), probe.stderr


def test_two_ranks_with_two_workers_each_read_disjoint_samples_and_resume_exactly(shard_dir):
    """2 ranks x 2 DataLoader workers: one epoch is the whole dataset once; a reader stopped after k batches and
    resumed (workers restarted at the saved position) yields exactly the remaining batches."""
    per_rank = []
    for rank in range(2):
        reader = _reader(shard_dir, rank=rank, world_size=2, num_workers=2)
        per_rank.append([i for _ in range(reader.batches_per_epoch) for i in _ids(next(reader))])
        assert per_rank[-1] == [i for b in itertools.islice(_reader(shard_dir, rank=rank, world_size=2),
                                                            reader.batches_per_epoch) for i in _ids(b)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == 2 * 8 * (N // 16)  # whole batches on both ranks
    uninterrupted = [b.clone() for b in itertools.islice(_reader(shard_dir, num_workers=2), 20)]
    killed = _reader(shard_dir, num_workers=2)
    for _ in range(7):
        next(killed)
    state = killed.state_dict()
    resumed = _reader(shard_dir, num_workers=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[7:], itertools.islice(resumed, 13)))


# ---------------------------------------------------------------------------- remote MDS (StreamingDataset)


@pytest.fixture(scope="module")
def remote_mds(tmp_path_factory):
    """An MDS directory used as a *remote*: streaming copies its shards into a cache (its LocalDownloader; s3://,
    gs://, ... take the same path through their own downloaders)."""
    out = tmp_path_factory.mktemp("remote") / "train"
    WRITERS["mds"](_sequences(), out, tokenizer_fingerprint=FP)
    return out


def _cached_shards(cache) -> set[str]:
    return {p.name for p in cache.iterdir() if p.name.endswith(".mds")}


def test_remote_mds_streams_shards_into_the_cache_on_first_use_and_reads_the_same_batches(remote_mds, tmp_path):
    cache = tmp_path / "cache"
    reader = _reader(cache, remote=str(remote_mds), shuffle=False, batch_size=10)
    assert _cached_shards(cache) == set()  # opening fetched the manifest and index only
    first = next(reader)
    assert 1 <= len(_cached_shards(cache)) <= 2  # the shard(s) holding samples 0-9, nothing else
    rest = list(reader)
    assert torch.equal(torch.cat([first, *rest]), torch.from_numpy(_sequences().astype(np.int64)))
    assert len(_cached_shards(cache)) == len(json.loads((remote_mds / "manifest.json").read_text())["shards"])


def test_remote_mds_resumes_exactly_with_workers(remote_mds, tmp_path):
    local = [b.clone() for b in itertools.islice(_reader(remote_mds), 20)]
    killed = _reader(tmp_path / "cache", remote=str(remote_mds), num_workers=2)
    for _ in range(7):
        next(killed)
    state = killed.state_dict()
    del killed
    resumed = _reader(tmp_path / "cache2", remote=str(remote_mds), num_workers=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(local[7:], itertools.islice(resumed, 13), strict=True))


def test_corrupt_remote_shard_is_detected_when_it_arrives_and_not_kept(remote_mds, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(remote_mds, remote)
    manifest = json.loads((remote / "manifest.json").read_text())
    bad = manifest["shards"][2]["file"]
    data = bytearray((remote / bad).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (remote / bad).write_bytes(bytes(data))
    cache = tmp_path / "cache"
    reader = _reader(cache, remote=str(remote), shuffle=False, batch_size=10)
    next(reader)  # shards 0-1 are fine
    with pytest.raises(ShardError, match=rf"{bad}: corrupt: sha256 differs.*downloaded from {remote}"):
        list(reader)
    assert bad not in _cached_shards(cache)


def test_remote_errors_name_what_is_wrong(remote_mds, tmp_path):
    with pytest.raises(ShardError, match="cannot fetch the manifest"):
        _reader(tmp_path / "c1", remote=str(tmp_path / "nowhere"))
    with pytest.raises(ShardError, match=r"manifest.json does not match this reader: seq_len: manifest 16, expected 8"):
        _reader(tmp_path / "c2", remote=str(remote_mds), seq_len=8)
    tar = tmp_path / "tar"
    WRITERS["webdataset"](_sequences(40), tar)
    with pytest.raises(ShardError, match="remote streaming reads MDS shards"):
        _reader(tmp_path / "c3", remote=str(tar))
