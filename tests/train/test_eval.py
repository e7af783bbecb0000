"""A short real training run (FSDD speech) and everything downstream: eval, transcribe (also streaming), plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmu_asr.data.shards import ShardSet
from lmu_asr.infer import transcribe_features
from lmu_asr.text import error_rates
from lmu_asr.train.checkpoint import model_from_checkpoint
from lmu_asr.train.metrics import read_jsonl
from tests.helpers import FSDD, read_transcripts, run_cli

ARGS = ["--preset", "cpu-tiny", "--batch-frames", "3000", "--seed", "3", "--no-progress", "--epochs", "4"]


@pytest.fixture(scope="module")
def trained(train_shards: Path, dev_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run") / "full"
    code, output = run_cli("train", "--shards", str(train_shards), "--dev-shards", str(dev_shards), "--out",
                           str(run), *ARGS)
    assert code == 0, output
    return run


@pytest.fixture(scope="module")
def trained_causal(train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run") / "causal"
    code, output = run_cli("train", "--shards", str(train_shards), "--out", str(run), *ARGS, "--set",
                           "model.attention=window", "--set", "model.attn_left=16", "--max-steps", "12")
    assert code == 0, output
    return run


def test_loss_falls_and_checkpoints_are_written(trained: Path) -> None:
    steps = read_jsonl(trained / "log.jsonl")
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    evals = read_jsonl(trained / "eval.jsonl")
    assert [r["epoch"] for r in evals] == [0, 1, 2, 3]
    assert evals[-1]["dev_loss"] < evals[0]["dev_loss"]
    ckpts = trained / "checkpoints"
    assert {p.name for p in ckpts.glob("checkpoint_epoch_?.pt")} == {f"checkpoint_epoch_{e}.pt" for e in range(4)}
    best = list(ckpts.glob("checkpoint_epoch_*_best.pt"))
    assert len(best) == 1
    best_epoch = int(best[0].name.split("_")[2])
    assert best_epoch == min(range(4), key=lambda e: (evals[e]["dev_wer"], evals[e]["dev_loss"]))


def test_eval_matches_decoding_each_utterance_alone(trained: Path, dev_shards: Path, tmp_path: Path) -> None:
    ckpt = trained / "checkpoints" / "checkpoint_epoch_3.pt"
    report = tmp_path / "report.json"
    code, output = run_cli("eval", "--checkpoint", str(ckpt), "--shards", str(dev_shards), "--report", str(report))
    assert code == 0, output and "WER" in output
    res = json.loads(report.read_text())
    shards = ShardSet.open(dev_shards)
    model, _ = model_from_checkpoint(ckpt)
    refs, hyps = [], []
    for i in range(len(shards)):
        feats, text = shards.read(i)
        refs.append(text)
        hyps.append(transcribe_features(model, torch.from_numpy(feats.astype("float32"))))
    alone = error_rates(refs, hyps)
    assert res["utterances"] == len(shards)
    assert res["wer"] == pytest.approx(alone.wer) and res["cer"] == pytest.approx(alone.cer)
    assert sorted((h[1], h[2]) for h in res["hypotheses"]) == sorted(zip(refs, hyps, strict=True))
    counts = [c["count"] for c in res["confusions"]]  # the most frequent word errors, first ones printed
    assert counts == sorted(counts, reverse=True) and sum(counts) <= res["word_errors"]
    assert len(counts) == 15 or sum(counts) == res["word_errors"]
    import pyarrow.parquet as pq

    index = pq.read_table(dev_shards / "index.parquet", columns=["speaker"]).column("speaker").to_pylist()
    by_speaker = res["per_speaker"]  # the index names FSDD's speakers: each one's share adds up to the totals
    assert {k: v["utterances"] for k, v in by_speaker.items()} == {s: index.count(s) for s in set(index)}
    assert sum(v["word_errors"] for v in by_speaker.values()) == res["word_errors"]
    assert f"WER by speaker ({len(by_speaker)}): " in output
    if res["confusions"]:
        first = res["confusions"][0]
        assert f"most frequent word errors: {first['reference'] or '(none)'} -> " \
            f"{first['hypothesis'] or '(none)'} ({first['count']})" in output
    code, output = run_cli("eval", "--checkpoint", str(ckpt), "--shards", str(dev_shards), "--beam", "4",
                           "--report", str(tmp_path / "beam.json"))
    assert code == 0 and "beam 4" in output


def test_transcribe_files(trained: Path, tmp_path: Path) -> None:
    rows = read_transcripts(FSDD)[:3]
    files = [str(FSDD / r["path"]) for r in rows]  # 8 kHz FLAC: resampled like prep does
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....not audio")
    ckpt = str(next((trained / "checkpoints").glob("*_best.pt")))
    code, output = run_cli("transcribe", "--checkpoint", ckpt, *files)
    assert code == 0
    lines = output.rstrip("\n").splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    assert all(len(line.split("\t")) == 2 for line in lines)
    code, output = run_cli("transcribe", "--checkpoint", ckpt, files[0], str(broken))
    assert code == 1 and "error: cannot decode" in output and output.startswith(files[0])
    code, output = run_cli("transcribe", "--checkpoint", ckpt, "--streaming", files[0])
    assert code == 2 and "full-context attention" in output


def test_streaming_transcription_equals_whole_utterance(trained_causal: Path) -> None:
    files = [str(FSDD / r["path"]) for r in read_transcripts(FSDD)[100:106]]
    ckpt = str(trained_causal / "checkpoints" / "last.pt")
    code, whole = run_cli("transcribe", "--checkpoint", ckpt, *files)
    assert code == 0
    for chunk in ("7", "32"):
        code, streamed = run_cli("transcribe", "--checkpoint", ckpt, "--streaming", "--chunk-frames", chunk, *files)
        assert code == 0 and streamed == whole


def test_plot(trained: Path) -> None:
    code, output = run_cli("plot", str(trained))
    assert code == 0 and Path(output.strip()).is_file() and Path(output.strip()).stat().st_size > 5000
