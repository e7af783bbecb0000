"""lmuasr prep on a real-speech mini corpus through lhotse's real GigaSpeech recipe."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmu_asr.prep.features import compute_fbank, load_audio
from lmu_asr.prep.shards import iter_shard, read_sample
from tests.conftest import SHARD_FRAMES
from tests.helpers import expected_segments, expected_texts, run_cli


def shard_contents(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    return {k: (f, m) for shard in sorted(out.glob("shard-*.tar")) for k, f, m in iter_shard(shard)}


def test_counts_texts_and_rejections(mini_corpus: Path, xs_shards: Path) -> None:
    segments = expected_segments(mini_corpus, "XS")
    expected = expected_texts(mini_corpus, "XS")
    contents = shard_contents(xs_shards)
    assert {k: m["text"] for k, (_, m) in contents.items()} == expected
    rejected = [json.loads(line) for line in (xs_shards / "rejected.jsonl").read_text().splitlines()]
    assert {r["key"] for r in rejected} == set(segments) - set(expected)
    assert {r["reason"] for r in rejected} == {"no_speech_text"}  # the garbage-tag segments, each counted
    meta = json.loads((xs_shards / "meta.json").read_text())
    assert meta["counts"]["utterances"] == len(expected) and meta["counts"]["rejected"] == len(rejected)
    assert meta["counts"]["rejected_by_reason"] == {"no_speech_text": len(rejected)}
    assert meta["lhotse_version"] and meta["source"]["subset"] == "XS"
    for key, (feats, m) in contents.items():
        assert feats.dtype == np.float16 and feats.shape == (m["num_frames"], 80)
        assert m["speaker"] and m["recording"] == key.split("_S")[0]


def test_features_agree_with_lhotse(mini_corpus: Path, xs_shards: Path) -> None:
    """Shard features = lhotse Fbank of the whole recording, cut per segment (float16 rounding only); against
    lhotse Fbank of the segment audio alone they agree on every frame whose window lies inside the segment."""
    from lhotse import Fbank

    corpus = json.loads((mini_corpus / "GigaSpeech.json").read_text())
    contents = shard_contents(xs_shards)
    fbank = Fbank()
    checked = 0
    for audio in corpus["audios"][:12]:
        samples, _ = load_audio(mini_corpus / audio["path"])
        whole = fbank.extract(samples, 16000)  # lhotse itself, not our blockwise code
        for seg in audio["segments"]:
            if seg["sid"] not in contents:
                continue
            feats, meta = contents[seg["sid"]]
            first = round(seg["begin_time"] * 100)
            ref = whole[first:first + meta["num_frames"]]
            np.testing.assert_allclose(feats.astype(np.float32), ref, atol=0.02, rtol=2e-3)  # float16 storage
            alone = fbank.extract(samples[round(seg["begin_time"] * 16000):round(seg["end_time"] * 16000)], 16000)
            n = min(len(alone), len(feats))
            interior = slice(2, n - 2)  # the first/last windows reach past the segment: edge padding differs
            assert np.abs(feats[interior].astype(np.float32) - alone[interior]).max() < 0.02
            checked += 1
    assert checked > 20


def test_upstream_webdataset_and_tar_read_the_shards(xs_shards: Path) -> None:
    import webdataset as wds

    shards = sorted(str(p) for p in xs_shards.glob("shard-*.tar"))
    contents = shard_contents(xs_shards)
    seen = {}
    for sample in wds.WebDataset(shards, shardshuffle=False).decode():
        seen[sample["__key__"]] = sample
    assert set(seen) == set(contents)
    for key, sample in seen.items():
        np.testing.assert_array_equal(sample["fbank.npy"], contents[key][0])
        assert sample["json"] == contents[key][1]
    listing = subprocess.run(["tar", "tf", shards[0]], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) % 2 == 0
    assert all(a.endswith(".fbank.npy") and b == a.replace(".fbank.npy", ".json")
               for a, b in zip(listing[::2], listing[1::2], strict=True))


def test_index_parquet_and_dali_index(xs_shards: Path) -> None:
    index = pq.read_table(xs_shards / "index.parquet").to_pylist()
    contents = shard_contents(xs_shards)
    assert {r["key"] for r in index} == set(contents)
    for row in index:
        with open(xs_shards / row["shard"], "rb") as f:
            feats, meta = read_sample(f, row["fbank_offset"], row["fbank_size"], row["json_offset"],
                                      row["json_size"])
        np.testing.assert_array_equal(feats, contents[row["key"]][0])
        assert meta["text"] == row["text"] and row["text_len"] == len(row["text"])
        assert row["num_frames"] == feats.shape[0] and row["duration"] == meta["duration"]
    # the DALI index equals what DALI's own wds2idx writes, when it is installed
    wds2idx = shutil.which("wds2idx")
    for shard in sorted(xs_shards.glob("shard-*.tar")):
        ours = shard.with_suffix(".idx").read_text()
        assert ours.startswith("v1.2 ")
        if wds2idx:
            theirs = shard.parent / (shard.stem + ".ref.idx")
            subprocess.run([wds2idx, str(shard), str(theirs)], check=True, capture_output=True)
            assert ours == theirs.read_text()
            theirs.unlink()


def test_statistics_and_balanced_shards(xs_shards: Path) -> None:
    meta = json.loads((xs_shards / "meta.json").read_text())
    feats = np.concatenate([f.astype(np.float64) for f, _ in shard_contents(xs_shards).values()])
    np.testing.assert_allclose(meta["stats"]["mean"], feats.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(meta["stats"]["std"], feats.std(0), rtol=1e-6)
    assert meta["stats"]["frames"] == feats.shape[0]
    frames = [s["frames"] for s in meta["shards"]]
    assert len(frames) >= 3
    longest = max(m["num_frames"] for _, m in shard_contents(xs_shards).values())
    # within a group, shards differ by at most one utterance; groups differ by at most their rounding
    assert max(frames) - min(frames) <= int(SHARD_FRAMES) // 2 + longest


def test_same_command_twice_is_a_noop_and_byte_identical(mini_corpus: Path, xs_shards: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "again"
    args = ["prep", "--corpus-dir", str(mini_corpus), "--subset", "xs", "--out", str(out),
            "--shard-frames", SHARD_FRAMES, "--shuffle-group", "2", "--no-progress"]  # --jobs 1 this time
    assert run_cli(*args)[0] == 0
    for shard in xs_shards.glob("shard-*"):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name  # independent of --jobs
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    code, output = run_cli(*args)
    assert code == 0 and "already complete" in output
    assert "stopped" not in output  # cached lhotse manifests are reused, not re-parsed
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}


def test_zstd_round_trip(mini_corpus: Path, xs_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "zstd"
    code, output = run_cli("prep", "--corpus-dir", str(mini_corpus), "--subset", "XS", "--out", str(out),
                           "--shard-frames", SHARD_FRAMES, "--shuffle-group", "2", "--compress", "zstd",
                           "--no-progress")
    assert code == 0, output
    plain, packed = shard_contents(xs_shards), shard_contents(out)
    assert plain.keys() == packed.keys()
    for key in plain:
        np.testing.assert_array_equal(plain[key][0], packed[key][0])
    assert sum(p.stat().st_size for p in out.glob("*.tar")) < sum(p.stat().st_size for p in xs_shards.glob("*.tar"))


def test_blockwise_fbank_is_exact() -> None:
    rng = np.random.default_rng(0)
    for n in (16000 * 3 + 37, 16000 * 3 + 80, 16000 * 3):
        x = (rng.standard_normal(n) * 0.1).astype(np.float32)
        np.testing.assert_array_equal(compute_fbank(x, block_frames=61), compute_fbank(x))


@pytest.mark.parametrize("subset", ["DEV", "test"])
def test_eval_subsets(mini_corpus: Path, tmp_path: Path, subset: str) -> None:
    out = tmp_path / subset
    assert run_cli("prep", "--corpus-dir", str(mini_corpus), "--subset", subset, "--out", str(out),
                   "--no-progress")[0] == 0
    texts = {k: m["text"] for k, (_, m) in shard_contents(out).items()}
    assert texts == expected_texts(mini_corpus, subset)
