"""Epoch plans from a synthetic index: rank balance, bucketing, skips, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from lmu_asr.config import DataConfig
from lmu_asr.data.sampler import (
    bucket_lengths,
    capacity,
    epoch_plan,
    eval_plan,
    planned_shapes,
    shuffle_buffer,
)
from lmu_asr.data.shards import ShardSet, label_stats


def fake_shards(n_shards: int, per_shard: int, seed: int = 0, long_every: int = 0) -> ShardSet:
    rng = np.random.default_rng(seed)
    n = n_shards * per_shard
    frames = rng.integers(40, 1200, n)
    if long_every:
        frames[::long_every] = 5000
    texts = ["A" * int(rng.integers(1, 20)) if i % 97 else "AB" * 400 for i in range(n)]
    return ShardSet.from_arrays(None, {}, [f"shard-{i:06d}.tar" for i in range(n_shards)],  # type: ignore[arg-type]
                                shard_sizes=np.full(n_shards, 1 << 40), num_frames=frames,
                                shard_id=np.repeat(np.arange(n_shards), per_shard).astype(np.int32),
                                position=np.tile(np.arange(per_shard), n_shards),
                                min_out_frames=np.array([sum(label_stats(t)) for t in texts]))


CFG = DataConfig(batch_frames=8000, max_frames=3000, shuffle_buffer=50, partial_batches="pow2")


def test_full_partial_batches_give_one_shape_per_bucket() -> None:
    cfg = DataConfig(batch_frames=8000, max_frames=3000, shuffle_buffer=50, partial_batches="full")
    batches, stats = epoch_plan(fake_shards(3, 40), cfg, 2, epoch=0, seed=0)
    shapes = {(b.capacity, b.bucket) for b in batches}
    assert shapes <= set(planned_shapes(cfg, 2)) and len(planned_shapes(cfg, 2)) == len(bucket_lengths(cfg, 2))
    assert all(b.capacity == capacity(cfg, b.bucket) for b in batches)


@pytest.mark.parametrize("n_shards,world", [(3, 2), (5, 4), (1, 3), (7, 2)])
def test_ranks_get_equal_audio_and_disjoint_cover(n_shards: int, world: int) -> None:
    shards = fake_shards(n_shards, 40)
    plans = [epoch_plan(shards, CFG, 2, epoch=1, seed=3, rank=r, world=world) for r in range(world)]
    seen = [np.concatenate([b.indices for b in batches]) for batches, _ in plans]
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat.tolist()))  # disjoint
    eligible = set(np.flatnonzero((shards.num_frames <= 3000) & (shards.min_out_frames <= (shards.num_frames + 1) // 2)).tolist())
    assert set(flat.tolist()) == eligible  # and complete
    frames = [shards.num_frames[s].sum() for s in seen]
    assert max(frames) - min(frames) <= 2 * 3000  # equal audio up to an utterance at each cut


def test_bucketing_gives_static_shapes_and_skips_without_truncating() -> None:
    shards = fake_shards(4, 60, long_every=17)
    batches, stats = epoch_plan(shards, CFG, 2, epoch=0, seed=0)
    buckets = bucket_lengths(CFG, 2)
    assert buckets[-1] == 3000
    for b in batches:
        assert b.bucket in buckets
        assert (shards.num_frames[b.indices] <= b.bucket).all()
        assert b.bucket == buckets[0] or (shards.num_frames[b.indices] > buckets[buckets.index(b.bucket) - 1]).all()
        assert b.real <= b.capacity <= capacity(CFG, b.bucket)
    for bucket in {b.bucket for b in batches}:  # every batch of a bucket is full but at most one tail,
        mine = [b for b in batches if b.bucket == bucket]  # whose rows are rounded up to a power of two
        full = capacity(CFG, bucket)
        tails = [b for b in mine if b.real < full]
        assert len(tails) <= 1 and all(b.capacity == full for b in mine if b.real == full)
        for t in tails:
            assert t.capacity == min(full, 1 << (t.real - 1).bit_length())
    assert stats.skipped["longer_than_max_frames"] == int((shards.num_frames > 3000).sum())
    assert stats.skipped["transcript_too_long_for_ctc"] > 0
    shapes = {(b.bucket, b.capacity) for b in batches}
    assert len(shapes) <= 2 * len(buckets)
    assert {(rows, bucket) for bucket, rows in shapes} <= set(planned_shapes(CFG, 2))
    used = sum(b.bucket * b.capacity for b in batches)
    assert stats.padding_ratio == pytest.approx(1 - shards.num_frames[np.concatenate([b.indices for b in batches])].sum() / used)


def test_fixed_batch_size_mode() -> None:
    cfg = DataConfig(batch_size=48, max_frames=400, buckets=[128, 192, 256, 320, 400])
    shards = fake_shards(2, 300)
    batches, stats = epoch_plan(shards, cfg, 2, 0, 0)
    assert all(b.capacity == 48 for b in batches if b.real == 48)
    assert all(b.bucket <= 400 for b in batches)
    assert stats.skipped["longer_than_max_frames"] == int((shards.num_frames > 400).sum())


def test_plans_are_deterministic_per_epoch() -> None:
    shards = fake_shards(6, 50)
    a = epoch_plan(shards, CFG, 2, 2, 11)[0]
    b = epoch_plan(shards, CFG, 2, 2, 11)[0]
    c = epoch_plan(shards, CFG, 2, 3, 11)[0]
    assert [x.indices.tolist() for x in a] == [x.indices.tolist() for x in b]
    assert [x.indices.tolist() for x in a] != [x.indices.tolist() for x in c]


def test_shuffle_buffer_is_a_local_permutation() -> None:
    items = np.arange(1000)
    out = shuffle_buffer(items, 50, np.random.default_rng(0))
    assert sorted(out.tolist()) == items.tolist()
    assert not np.array_equal(out, items)
    # an item can only be emitted after it entered the buffer: out[k] <= k + buffer - 1
    assert (out[:950] <= np.arange(950) + 49).all()


def test_eval_plan_covers_everything_once_even_long_ones() -> None:
    shards = fake_shards(3, 30, long_every=7)
    seen = []
    for rank in range(2):
        batches, _ = eval_plan(shards, CFG, 2, rank, 2)
        seen += np.concatenate([b.indices for b in batches]).tolist()
    assert sorted(seen) == list(range(len(shards)))  # infeasible and over-long ones are scored too
