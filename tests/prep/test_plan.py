"""Planning is pure metadata: check grouping, balance, determinism and key handling without any audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmu_asr.prep.plan import RecordingJob, Segment, plan_groups, sanitize_key
from lmu_asr.prep.shards import MAX_KEY_LEN


def synthetic_jobs(n_recordings: int, seed: int) -> list[RecordingJob]:
    rng = np.random.default_rng(seed)
    jobs = []
    for r in range(n_recordings):
        job = RecordingJob(f"REC{r:04d}", None, {}, 1000.0)
        for s in range(int(rng.integers(1, 60))):
            frames = int(rng.integers(50, 1500))
            job.segments.append(Segment(f"REC{r:04d}_S{s:04d}", job.recording_id, s * 10.0, frames / 100, frames,
                                        "TEXT", "spk"))
        jobs.append(job)
    return jobs


def test_every_segment_assigned_once_and_shards_balanced() -> None:
    jobs = synthetic_jobs(300, 0)
    groups = plan_groups(jobs, shard_frames=200_000, shuffle_group=3, seed=5)
    keys = [k for g in groups for k in g.assignment]
    assert sorted(keys) == sorted(s.key for j in jobs for s in j.segments)
    shard_ids = sorted({shard for g in groups for shard, _ in g.assignment.values()})
    assert shard_ids == list(range(len(shard_ids)))  # contiguous numbering across groups
    frames = {j: 0 for j in shard_ids}
    positions: dict[int, list[int]] = {j: [] for j in shard_ids}
    seg_frames = {s.key: s.num_frames for j in jobs for s in j.segments}
    for g in groups:
        for key, (shard, pos) in g.assignment.items():
            frames[shard] += seg_frames[key]
            positions[shard].append(pos)
    for shard in shard_ids:
        assert sorted(positions[shard]) == list(range(len(positions[shard])))
    for g in groups:  # within a group, greedy dealing keeps shards within one utterance of each other
        in_group = [frames[s] for s in range(g.first_shard, g.first_shard + g.num_shards)]
        assert max(in_group) - min(in_group) <= 1500
    total = sum(frames.values())
    assert abs(len(shard_ids) - total / 200_000) <= len(groups)  # about shard_frames each


def test_plan_depends_on_the_seed_not_on_input_order() -> None:
    jobs = synthetic_jobs(80, 1)
    a = plan_groups(jobs, 50_000, 2, seed=3)
    b = plan_groups(list(reversed(synthetic_jobs(80, 1))), 50_000, 2, seed=3)
    c = plan_groups(synthetic_jobs(80, 1), 50_000, 2, seed=4)
    merged = lambda groups: {k: v for g in groups for k, v in g.assignment.items()}  # noqa: E731
    assert merged(a) == merged(b)
    assert merged(a) != merged(c)


def test_shards_mix_recordings() -> None:
    groups = plan_groups(synthetic_jobs(200, 2), shard_frames=100_000, shuffle_group=4, seed=0)
    recordings_per_shard: dict[int, set[str]] = {}
    for g in groups:
        for key, (shard, _) in g.assignment.items():
            recordings_per_shard.setdefault(shard, set()).add(key.split("_")[0])
    assert min(len(r) for r in recordings_per_shard.values()) > 5


def test_sanitize_key() -> None:
    assert sanitize_key("POD0000000004_S0000000") == "POD0000000004_S0000000"
    assert sanitize_key("a.b/c d") == "a_b_c_d"
    long = sanitize_key("x" * 300)
    assert len(long) <= MAX_KEY_LEN and long != sanitize_key("x" * 299)


def test_plan_only_counts_what_prep_writes_and_writes_no_shard(synth_corpus: Path, synth_shards: Path,
                                                               tmp_path: Path) -> None:
    from tests.helpers import run_cli

    code, output = run_cli("prep", "--corpus-dir", str(synth_corpus), "--subset", "xs", "--out",
                           str(tmp_path / "o"), "--shard-frames", "3000", "--shuffle-group", "2", "--plan-only",
                           "--no-progress")
    assert code == 0, output
    meta = json.loads((synth_shards / "meta.json").read_text())
    assert f"{meta['counts']['utterances']:,} segments" in output
    assert f"{meta['counts']['rejected']:,} rejected" in output and f"{meta['counts']['shards']} shard(s)" in output
    assert not list((tmp_path / "o").glob("shard-*")) and not (tmp_path / "o" / "index.parquet").exists()


def test_bench_prep_plan_on_synthetic_gigaspeech(tmp_path: Path) -> None:
    """The scaling bench runs the real prep up to decoding and the real index assembly, at toy sizes here."""
    import pyarrow.parquet as pq

    from lmu_asr.bench.prep_scale import simulate
    from lmu_asr.bench.synthetic import write_synthetic_gigaspeech

    corpus = write_synthetic_gigaspeech(tmp_path / "c", 3000, per_recording=50)
    res = simulate(corpus, tmp_path / "o")
    assert res["segments"] == res["index_rows"] == 3000
    index = pq.read_table(tmp_path / "o" / "index.parquet")
    assert index.num_rows == 3000 and len(set(index.column("key").to_pylist())) == 3000
    assert set(res["timings"]) >= {"validate_input_s", "lhotse_manifests_s", "plan_groups_s", "finalize_s"}
