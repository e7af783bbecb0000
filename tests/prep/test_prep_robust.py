"""Prep under bad conditions: kill -9 and resume, corrupt/missing/48 kHz audio, bad segments, user errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from lmu_asr.prep.features import compute_fbank, load_audio, resample
from lmu_asr.text import normalize_transcript
from tests.conftest import SHARD_FRAMES
from tests.helpers import LJSPEECH, expected_segments, expected_texts, read_transcripts, run_cli
from tests.prep.test_prep import shard_contents


def prep_args(corpus: Path, out: Path, subset: str = "S") -> list[str]:
    return ["prep", "--corpus-dir", str(corpus), "--subset", subset, "--out", str(out), "--shard-frames", "2500",
            "--shuffle-group", "1", "--no-progress"]


def test_kill_9_then_resume_is_byte_identical(mini_corpus: Path, tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run_cli(*prep_args(mini_corpus, reference))[0] == 0
    n_groups = len(list((reference / ".prep" / "groups").glob("group-*.json")))
    assert n_groups >= 4
    proc = subprocess.Popen([sys.executable, "-m", "lmu_asr.cli", *prep_args(mini_corpus, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = killed / ".prep" / "groups" / "group-000001.json"
    deadline = time.time() + 120
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "meta.json").exists(), "prep finished before it could be killed; make the corpus larger"
    markers = [json.loads(p.read_text()) for p in (killed / ".prep" / "groups").glob("group-*.json")]
    assert markers, "no group finished before the kill"
    finished = {s["name"]: (killed / s["name"]).stat() for m in markers for s in m["shards"]}
    code, output = run_cli(*prep_args(mini_corpus, killed))
    assert code == 0, output
    assert "resumed:" in output
    for name, before in finished.items():  # shards of groups finished before the kill were not rewritten
        after = (killed / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    ref_files = sorted(p.name for p in reference.glob("shard-*"))
    assert ref_files == sorted(p.name for p in killed.glob("shard-*"))
    for name in ref_files:
        assert (reference / name).read_bytes() == (killed / name).read_bytes(), name
    assert not list(killed.glob("*.tmp"))
    assert pq.read_table(reference / "index.parquet").equals(pq.read_table(killed / "index.parquet"))
    assert (reference / "rejected.jsonl").read_text() == (killed / "rejected.jsonl").read_text()


@pytest.fixture
def damaged_corpus(mini_corpus: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the corpus with one corrupt, one missing, one 48 kHz file and two bad segment entries."""
    corpus = tmp_path / "damaged"
    shutil.copytree(mini_corpus, corpus)
    meta = json.loads((corpus / "GigaSpeech.json").read_text())
    xs = [a for a in meta["audios"] if "{XS}" in a["subsets"]]
    corrupt, missing, hi_rate, edited = xs[0], xs[1], xs[2], xs[3]
    path = corpus / corrupt["path"]
    data = bytearray(path.read_bytes())
    data[200:] = os.urandom(len(data) - 200)  # header survives, the stream is garbage
    path.write_bytes(bytes(data))
    (corpus / missing["path"]).unlink()
    samples, _ = load_audio(corpus / hi_rate["path"])
    sf.write(corpus / hi_rate["path"], resample(samples, 16000, 48000), 48000, format="OGG", subtype="OPUS")
    speech = [s for s in edited["segments"] if not s["text_tn"].startswith("<")]
    speech[0]["end_time"] = edited["duration"] + 5.0  # runs past the end: lhotse would trim it
    speech[1]["text_tn"] = ""
    (corpus / "GigaSpeech.json").write_text(json.dumps(meta))
    return corpus, {"corrupt": corrupt["aid"], "missing": missing["aid"], "hi_rate": hi_rate["aid"],
                    "out_of_range": speech[0]["sid"], "empty": speech[1]["sid"]}


def test_bad_audio_and_segments_are_rejected_never_lost(damaged_corpus, xs_shards: Path, tmp_path: Path) -> None:
    corpus, bad = damaged_corpus
    out = tmp_path / "out"
    code, output = run_cli(*prep_args(corpus, out, "XS"))
    assert code == 0, output
    records = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    rejected = {r["key"]: r for r in records}
    assert len(rejected) == len(records)  # one record per rejected segment
    kept = shard_contents(out)
    assert rejected[bad["out_of_range"]]["reason"] == "out_of_range"
    assert rejected[bad["empty"]]["reason"] == "empty_transcript"
    by_recording = {}
    for r in rejected.values():
        by_recording.setdefault(r["recording"], set()).add(r["reason"])
    assert by_recording[bad["corrupt"]] >= {"unreadable_audio"}
    assert "not found" in next(r["detail"] for r in rejected.values() if r["recording"] == bad["missing"]
                               and r["reason"] == "unreadable_audio")
    # every segment is either kept or rejected with a reason: nothing silently lost
    segments = expected_segments(corpus, "XS")
    assert set(kept) | set(rejected) == set(segments) and not set(kept) & set(rejected)
    good = expected_texts(corpus, "XS")
    lost = {k for k in good if k not in kept and rejected[k]["recording"] not in (bad["corrupt"], bad["missing"])}
    assert lost == {bad["out_of_range"]}  # the empty one is not in `good`: it has no text
    # the 48 kHz file was resampled (and said so), its features match the 16 kHz original closely
    assert "48000 Hz" in output
    reference = shard_contents(xs_shards)
    hi = [k for k in kept if k.startswith(bad["hi_rate"])]
    assert hi
    for k in hi:
        diff = np.abs(kept[k][0].astype(np.float32) - reference[k][0].astype(np.float32))
        assert kept[k][0].shape == reference[k][0].shape and np.median(diff) < 1.0
    counts = json.loads((out / "meta.json").read_text())["counts"]["rejected_by_reason"]
    assert counts["unreadable_audio"] >= 2 and counts["out_of_range"] == 1 and counts["empty_transcript"] == 1
    first = (out / "rejected.jsonl").read_text()
    code, output = run_cli(*prep_args(corpus, out, "XS"))  # again: cached manifests, same verdicts
    assert code == 0 and (out / "rejected.jsonl").read_text() == first


def test_recipe_crash_falls_back_per_recording(mini_corpus: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "zero"
    shutil.copytree(mini_corpus, corpus)
    meta = json.loads((corpus / "GigaSpeech.json").read_text())
    audio = next(a for a in meta["audios"] if "{XS}" in a["subsets"])
    seg = audio["segments"][0]
    seg["end_time"] = seg["begin_time"]  # zero length: lhotse's recipe asserts and stops
    (corpus / "GigaSpeech.json").write_text(json.dumps(meta))
    code, output = run_cli(*prep_args(corpus, tmp_path / "out", "XS"))
    assert code == 0, output
    assert "prepare_gigaspeech stopped" in output
    kept = shard_contents(tmp_path / "out")
    assert set(kept) == set(expected_texts(mini_corpus, "XS")) - {seg["sid"]}


@pytest.mark.parametrize("make_args,message", [
    (lambda c, o: ["--corpus-dir", str(o / "nope"), "--subset", "xs"], "corpus directory not found"),
    (lambda c, o: ["--corpus-dir", str(o), "--subset", "xs"], "no GigaSpeech.json"),
    (lambda c, o: ["--corpus-dir", str(c), "--subset", "xxl"], "unknown GigaSpeech subset"),
    (lambda c, o: ["--corpus-dir", str(c)], "needs --subset"),
    (lambda c, o: [], "either --corpus-dir"),
    (lambda c, o: ["--cuts", str(o / "missing.jsonl.gz")], "cuts manifest not found"),
])
def test_user_errors_are_one_line(mini_corpus: Path, tmp_path: Path, make_args, message: str) -> None:
    code, output = run_cli("prep", *make_args(mini_corpus, tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and message in output
    assert output.count("\n") == 1 and "Traceback" not in output


def test_out_dir_guards(mini_corpus: Path, xs_shards: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, output = run_cli(*prep_args(mini_corpus, other, "XS"))
    assert code == 2 and "not an lmu-asr prep output" in output
    copy = tmp_path / "copy"
    shutil.copytree(xs_shards, copy)
    code, output = run_cli("prep", "--corpus-dir", str(mini_corpus), "--subset", "XS", "--out", str(copy),
                           "--shard-frames", SHARD_FRAMES, "--shuffle-group", "2", "--seed", "7", "--no-progress")
    assert code == 2 and "different configuration" in output and "seed" in output


def test_any_lhotse_cutset(tmp_path: Path) -> None:
    """LibriSpeech-style cuts (one per utterance) over 22.05 kHz FLAC with raw punctuated text."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    rows = read_transcripts(LJSPEECH)[:6] if LJSPEECH.exists() else pytest.skip("no ljspeech32")
    recs = [Recording.from_file(LJSPEECH / r["path"], recording_id=r["utt_id"]) for r in rows]
    sups = [SupervisionSegment(r["utt_id"], r["utt_id"], 0.0, rec.duration, text=r["raw_text"], speaker="LJ")
            for r, rec in zip(rows, recs, strict=True)]
    cuts = CutSet.from_manifests(RecordingSet.from_recordings(recs), SupervisionSet.from_segments(sups))
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    out = tmp_path / "out"
    code, output = run_cli("prep", "--cuts", str(tmp_path / "cuts.jsonl.gz"), "--out", str(out), "--no-progress")
    assert code == 0, output
    kept = shard_contents(out)
    assert {k: m["text"] for k, (_, m) in kept.items()} == {r["utt_id"].replace(".", "_"):
                                                            normalize_transcript(r["raw_text"]) for r in rows}
    assert "22050 Hz" in output
    for r in rows:
        ref = compute_fbank(load_audio(LJSPEECH / r["path"])[0])
        feats = kept[r["utt_id"]][0]
        np.testing.assert_allclose(feats.astype(np.float32), ref[: len(feats)], atol=0.02, rtol=2e-3)
