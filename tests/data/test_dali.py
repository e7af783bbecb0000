"""DALI's CPU pipeline over our shards yields the same utterances as the WebDataset path (GPU ops need a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmu_asr.config import DataConfig
from lmu_asr.data.shards import ShardSet

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install 'lmu-asr[dali]')")

from lmu_asr.data.dali import DaliSource  # noqa: E402

CFG = DataConfig(batch_size=8, max_frames=3000, shuffle_buffer=16)


def collect(source: DaliSource, limit: int | None = None) -> list[dict]:
    out = []
    for k, batch in enumerate(source):
        if limit is not None and k >= limit:
            break
        out.append(batch)
    return out


def rows(batches: list[dict]) -> dict[str, tuple[np.ndarray, str]]:
    seen = {}
    for b in batches:
        for r, key in enumerate(b["keys"]):
            n = int(b["lengths"][r])
            seen[key] = (b["feats"][r, :n].cpu().numpy(), b["texts"][r])
    return seen


def test_same_utterances_as_the_webdataset_path(xs_shards: Path) -> None:
    shards = ShardSet.open(xs_shards)
    source = DaliSource(shards, CFG, 2, seed=1, shuffle=False)
    got = rows(collect(source))
    assert set(got) == set(shards.key_list())
    for i, key in enumerate(shards.key_list()):
        feats, text = shards.read(i)
        np.testing.assert_array_equal(got[key][0], feats)
        assert got[key][1] == text
    batch = collect(DaliSource(shards, CFG, 2, seed=1, shuffle=False), limit=1)[0]
    assert batch["feats"].shape[1] % 2 == 0 and batch["targets"].shape == (8, batch["feats"].shape[1] // 2)


def test_two_ranks_split_evenly_and_resume_exactly(xs_shards: Path) -> None:
    shards = ShardSet.open(xs_shards)
    parts = [DaliSource(shards, CFG, 2, seed=3, rank=r, world=2) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    keys = [set(rows(collect(p))) for p in parts]
    assert keys[0] | keys[1] == set(shards.key_list()) and len(keys[0] & keys[1]) <= 1  # padding may repeat one
    source = DaliSource(shards, CFG, 2, seed=5)
    it = iter(source)
    for _ in range(3):
        next(it)
    ckpt = source.checkpoint()
    expected = next(it)
    resumed = next(iter(DaliSource(shards, CFG, 2, seed=5, checkpoint=ckpt)))
    assert resumed["keys"] == expected["keys"]
