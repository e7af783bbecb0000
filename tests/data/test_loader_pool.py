"""Workers reuse shared-memory feature buffers (FeaturePool): batches must equal in-process assembly, padding
zeros included, and a batch the caller still holds must never be overwritten."""

from __future__ import annotations

from pathlib import Path

import torch

from lmu_asr.bench.synthetic import write_synthetic_shards
from lmu_asr.config import load_config
from lmu_asr.data.dataset import BatchDataset, FeaturePool, make_loader
from lmu_asr.data.sampler import epoch_plan
from lmu_asr.data.shards import ShardSet


def _dataset(tmp_path: Path) -> BatchDataset:
    # lengths spread over the buckets, so a reused buffer held a longer row before (stale values to clear)
    folder = write_synthetic_shards(tmp_path / "shards", 600, 3, min_frames=40, max_frames=256)
    cfg = load_config("cpu-tiny", None, {"data.max_frames": 256, "data.buckets": "64,128,256",
                                         "data.batch_frames": 2048})
    shards = ShardSet.open(folder)
    batches, _ = epoch_plan(shards, cfg.data, cfg.model.downsample, 0, 0)
    return BatchDataset(shards, batches, cfg.model.downsample)


def test_pooled_worker_batches_equal_in_process_ones_and_held_batches_survive(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    hold, prefetch = 2, 2
    assert len(ds) > 3 * (prefetch + hold + 2)  # every buffer is reused several times
    kept: list[tuple[int, dict]] = []
    for k, b in enumerate(make_loader(ds, 0, num_workers=2, prefetch=prefetch, hold=hold)):
        kept = (kept + [(k, b)])[-hold:]
        for j, old in kept:  # the batches the caller holds are still exactly what they were
            ref = ds[j]
            assert torch.equal(old["feats"], ref["feats"]), j
            assert torch.equal(old["lengths"], ref["lengths"]) and torch.equal(old["targets"], ref["targets"])
        if k > 0:
            assert b["feats"].is_shared()
        # the whole batch crossed the process boundary as one buffer: one file-descriptor round trip, not four
        storages = {b[n].untyped_storage().data_ptr() for n in ("feats", "lengths", "targets", "target_lengths")}
        assert len(storages) == 1 and b["targets"].dtype == torch.int64 and b["feats"].dtype == torch.float16


def test_feature_pool_reuses_and_grows_its_buffers() -> None:
    pool = FeaturePool(2)
    a = pool.take_bytes(2 * 2 * 3 * 80)
    b = pool.take_bytes(2 * 4 * 3 * 80)
    c = pool.take_bytes(2 * 1 * 3 * 80)  # slot 0 again: same storage, smaller view
    d = pool.take_bytes(2 * 8 * 3 * 80)  # slot 1 again, too small: a new, larger storage
    assert c.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert d.untyped_storage().nbytes() == 2 * 8 * 3 * 80 != b.untyped_storage().nbytes()
    assert c.shape == (2 * 1 * 3 * 80,) and c.is_contiguous() and c.dtype == torch.uint8 and c.is_shared()
