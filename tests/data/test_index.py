"""The memory-mapped index cache: exactly the plan index.parquet gives, built once (atomically, under concurrency),
rebuilt when the index changes, elsewhere when the shard folder is read-only; the vectorised planner against
straightforward reference implementations."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmu_asr.bench.synthetic import make_sparse_files, write_synthetic_shards
from lmu_asr.config import DataConfig, load_config
from lmu_asr.data import index
from lmu_asr.data.dataset import BatchDataset
from lmu_asr.data.index import CACHE_NAME, ctc_min_frames
from lmu_asr.data.sampler import Batch, epoch_plan, shuffle_buffer
from lmu_asr.data.shards import ShardSet, label_stats
from tests.helpers import run_cli

CFG = DataConfig(batch_frames=4000, max_frames=800, shuffle_buffer=64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = write_synthetic_shards(tmp_path_factory.mktemp("idx") / "shards", 3000, 7, min_frames=20, max_frames=900,
                                 with_data=False)
    make_sparse_files(out)
    return out


def reference_set(folder: Path) -> ShardSet:
    """The index read the plain way: Python lists from the parquet, the CTC bound per string (the old reader)."""
    t = pq.read_table(folder / "index.parquet").to_pydict()
    names = sorted(set(t["shard"]))
    return ShardSet.from_arrays(folder, {}, names, shard_id=np.array([names.index(s) for s in t["shard"]]),
                                position=np.array(t["position"]), num_frames=np.array(t["num_frames"]),
                                json_offset=np.array(t["json_offset"]), json_size=np.array(t["json_size"]),
                                min_out_frames=np.array([sum(label_stats(x)) for x in t["text"]]))


def plan_of(shards: ShardSet, epoch: int, rank: int, world: int) -> list[tuple[int, int, list[int]]]:
    return [(b.bucket, b.capacity, b.indices.tolist()) for b in epoch_plan(shards, CFG, 2, epoch, 5, rank, world)[0]]


@pytest.mark.parametrize("world", [1, 3])
def test_cache_gives_exactly_the_plan_the_index_gives(folder: Path, world: int) -> None:
    cached, plain = ShardSet.open(folder), reference_set(folder)
    assert cached.cache_path == folder / CACHE_NAME
    np.testing.assert_array_equal(cached.min_out_frames, plain.min_out_frames)
    for epoch in (0, 1):
        for rank in range(world):
            assert plan_of(cached, epoch, rank, world) == plan_of(plain, epoch, rank, world)


def test_ctc_bound_matches_the_per_string_count() -> None:
    rng = np.random.default_rng(0)
    texts = ["", "A", "AA", "ABBA", "HELLO  WORLD", ""] + ["".join(rng.choice(list("AB "), rng.integers(0, 15)))
                                                            for _ in range(3000)]
    for arr, ref in ((pa.array(texts), texts), (pa.array(texts).slice(4, 100), texts[4:104])):
        lengths, bound = ctc_min_frames(arr)
        assert lengths.tolist() == [len(t) for t in ref]
        assert bound.tolist() == [sum(label_stats(t)) for t in ref]


def test_vectorised_shuffle_buffer_is_the_streaming_buffer() -> None:
    def reference(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        size = min(size, len(items))
        buf, out = list(items[:size]), []
        picks = rng.integers(0, size, len(items) - size)
        for k, nxt in enumerate(items[size:].tolist()):
            out.append(buf[picks[k]])
            buf[picks[k]] = nxt
        return np.array(out + list(np.asarray(buf)[rng.permutation(size)]), dtype=items.dtype)

    for n, size in [(1, 4), (4, 4), (50, 7), (1000, 1), (5000, 300)]:
        items = np.random.default_rng(n).permutation(n)
        got = shuffle_buffer(items, size, np.random.default_rng(3))
        want = reference(items, size, np.random.default_rng(3)) if size > 1 and n > 1 else items
        np.testing.assert_array_equal(got, want)


def _open_and_plan(path: str) -> list:
    return plan_of(ShardSet.open(path), 0, 0, 1)


def test_eight_ranks_open_a_fresh_folder_at_once(tmp_path: Path) -> None:
    out = write_synthetic_shards(tmp_path / "s", 2000, 4, with_data=False)
    make_sparse_files(out)
    with mp.get_context("spawn").Pool(8) as pool:
        plans = pool.map(_open_and_plan, [str(out)] * 8)
    assert all(p == plans[0] for p in plans) and plans[0]
    assert (out / CACHE_NAME).is_file() and not list(out.glob("*.tmp"))


def test_a_changed_index_is_reread_and_a_read_only_folder_caches_elsewhere(tmp_path: Path, monkeypatch) -> None:
    out = write_synthetic_shards(tmp_path / "s", 500, 2, with_data=False)
    make_sparse_files(out)
    first = ShardSet.open(out)
    write_synthetic_shards(out, 400, 2, seed=9, with_data=False)  # the index is rewritten (another prep)
    make_sparse_files(out)
    assert len(ShardSet.open(out)) == 400 and len(first) == 500
    (out / CACHE_NAME).unlink()
    monkeypatch.setenv("LMU_ASR_CACHE", str(tmp_path / "user-cache"))
    write = index._write

    def read_only(table: pa.Table, path: Path) -> None:  # the shard folder refuses writes (root ignores chmod)
        if path.parent == out:
            raise PermissionError(13, "Permission denied", str(path))
        write(table, path)

    monkeypatch.setattr(index, "_write", read_only)
    shards = ShardSet.open(out)
    assert shards.cache_path.parent == tmp_path / "user-cache" and len(shards) == 400
    assert not (out / CACHE_NAME).exists()


def test_workers_get_a_few_hundred_bytes_not_the_index(folder: Path) -> None:
    shards = ShardSet.open(folder)
    blob = pickle.dumps(BatchDataset(shards, None, 2))
    assert len(blob) < 4096
    again = pickle.loads(blob).shards
    assert again.cache_path == shards.cache_path and plan_of(again, 0, 0, 1) == plan_of(shards, 0, 0, 1)
    assert isinstance(epoch_plan(shards, CFG, 2, 0, 5)[0][0], Batch)


def test_prep_reindex_builds_the_cache(folder: Path, tmp_path: Path) -> None:
    (folder / CACHE_NAME).unlink(missing_ok=True)
    code, output = run_cli("prep", "--reindex", "--out", str(folder))
    assert code == 0 and "index cache of 3,000 utterances in 7 shard(s)" in output
    assert (folder / CACHE_NAME).is_file()
    code, output = run_cli("prep", "--reindex", "--out", str(tmp_path / "nothing"))
    assert code == 2 and "not found" in output


def test_dry_run_on_a_folder_without_audio(folder: Path, tmp_path: Path) -> None:
    """Opening reads the index and the shards' sizes, never their contents (these shards are all zeros)."""
    code, output = run_cli("train", "--shards", str(folder), "--out", str(tmp_path / "r"), "--preset", "fast",
                           "--dry-run", "--device", "cpu")
    assert code == 0 and "3000 utterances" in output
    assert load_config("fast").data.max_frames == 3000
