"""Unsupervised adaptation (``lmuasr adapt``): it never reads the adapted set's transcripts, keeps the most confident
hypotheses, fits them, and writes a checkpoint the other commands take; bad flags are one-line errors."""

from __future__ import annotations

import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from lmu_asr import UserError
from lmu_asr.data.shards import ShardSet
from lmu_asr.model.asr import ctc_loss
from lmu_asr.text import encode
from lmu_asr.train.adapt import AdaptOptions, adapt, collate, frame_batches, pseudo_labels
from lmu_asr.train.checkpoint import model_from_checkpoint
from lmu_asr.train.evaluate import ctc_feasible
from tests.helpers import run_cli

QUICK = AdaptOptions(rounds=1, epochs=1, keep=0.5, labelled_ratio=1.0, batch_frames=2000, seed=4)


def _checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("*.pt"))[-1]


def _scrambled_copy(shards: Path, out: Path) -> Path:
    """The same shards with every transcript's letters replaced (same length, so the index still matches)."""
    shutil.copytree(shards, out)
    for tar in out.glob("*.tar"):
        data = bytearray(tar.read_bytes())
        with tarfile.open(tar) as tf:
            members = [m for m in tf.getmembers() if m.name.endswith(".json")]
        for m in members:
            start = m.offset_data + data[m.offset_data: m.offset_data + m.size].index(b'"text":"') + 8
            end = data.index(b'"', start)
            data[start:end] = bytes(b if b == ord(" ") else ord("Q") for b in data[start:end])
        tar.write_bytes(bytes(data))
    return out


def test_frame_batches_hold_every_index_once_within_the_budget() -> None:
    lengths = [random.Random(1).randint(5, 300) for _ in range(200)]
    batches = frame_batches(lengths, 1000, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(max(lengths[i] for i in b) * len(b) <= 1000 for b in batches)
    assert batches == frame_batches(lengths, 1000, random.Random(0)) != frame_batches(lengths, 1000, random.Random(1))
    assert frame_batches([5000, 10], 1000, random.Random(0)) in ([[0], [1]], [[1], [0]])  # too long: alone


def test_adapt_never_reads_the_transcripts_of_the_set_it_adapts_to(window_run: Path, synth_shards: Path,
                                                                   synth_dev: Path, tmp_path: Path) -> None:
    """Adapting to a copy whose transcripts are all Q's gives bit for bit the weights the real transcripts give."""
    scrambled = _scrambled_copy(synth_dev, tmp_path / "dev_q")
    text = ShardSet.open(scrambled).read(0)[1]
    assert set(text) <= {"Q", " "} and text != ShardSet.open(synth_dev).read(0)[1]  # the copy really differs
    weights, reports = [], []
    for target in (synth_dev, scrambled):
        model, cfg = model_from_checkpoint(_checkpoint(window_run))
        reports.append(adapt(model, cfg, ShardSet.open(target), torch.device("cpu"), QUICK,
                             labelled=ShardSet.open(synth_shards), progress=False))
        assert not model.training and model.augment is None  # as it came: eval mode, no SpecAugment
        weights.append(model.state_dict())
    before = model_from_checkpoint(_checkpoint(window_run))[0].state_dict()
    assert any(not torch.equal(before[k], weights[0][k]) for k in before)  # it did change the model
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [(r["kept"], r["min_confidence"], r["loss"]) for r in reports[0]["rounds"]] == \
        [(r["kept"], r["min_confidence"], r["loss"]) for r in reports[1]["rounds"]]


def test_the_most_confident_hypotheses_are_kept_and_fitted(window_run: Path, synth_dev: Path) -> None:
    model, cfg = model_from_checkpoint(_checkpoint(window_run))
    target, dev = ShardSet.open(synth_dev), torch.device("cpu")
    hyps = [h for h in pseudo_labels(model, target, cfg, dev, None) if h[1]]
    assert len(hyps) >= 4, "the fixture model should hear something in most utterances"
    feats = {target.key(i): target.read(i)[0] for i in range(len(target))}

    def loss_on(m: torch.nn.Module) -> float:  # CTC loss of the model's first hypotheses, as labels
        b = collate([(feats[k], encode(t)) for k, t, _ in hyps], cfg.model.downsample)
        with torch.no_grad():
            logits, out_lengths = m(b[0], b[1])
        ok = ctc_feasible(out_lengths, b[2], b[3])
        return float(ctc_loss(logits[ok], out_lengths[ok], b[2][ok], b[3][ok]))

    start = loss_on(model)
    opts = AdaptOptions(rounds=1, epochs=4, keep=0.5, lr=1e-3, labelled_ratio=0, seed=1)
    report = adapt(model, cfg, target, dev, opts, progress=False)
    (r,) = report["rounds"]
    ranked = sorted((h[2] for h in hyps), reverse=True)
    assert (r["hypotheses"], r["kept"]) == (len(hyps), round(len(hyps) * 0.5))
    assert r["min_confidence"] == pytest.approx(ranked[r["kept"] - 1], rel=1e-6)  # the top half, no lower
    assert loss_on(model) < start  # the kept half taught the model its own first answers
    assert report["decoder"] == "greedy" and report["utterances"] == len(target)


def test_a_model_that_hears_only_silence_is_a_clear_error(tiny_run: Path, synth_dev: Path) -> None:
    model, cfg = model_from_checkpoint(_checkpoint(tiny_run))
    with torch.no_grad():
        model.head.bias[0] = 1e4  # blank wins every frame
    target = ShardSet.open(synth_dev)
    assert not any(h[1] for h in pseudo_labels(model, target, cfg, torch.device("cpu"), None))
    with pytest.raises(UserError, match="nothing but silence"):
        adapt(model, cfg, target, torch.device("cpu"), QUICK, progress=False)


def test_the_demo_skips_adaptation_of_a_model_that_hears_only_silence(tiny_run: Path, synth_shards: Path,
                                                                       synth_dev: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """After training has run, an unadaptable model costs the demo its +adapt rows, not its report."""
    from lmu_asr.demo import DemoOptions, adapt_stage

    source = _checkpoint(tiny_run)
    model, cfg = model_from_checkpoint(source)
    with torch.no_grad():
        model.head.bias[0] = 1e4
    results: dict = {}
    out = adapt_stage(model, cfg, torch.device("cpu"), {"test": synth_dev, "train": synth_shards}, None,
                      (source, tmp_path / "adapted.pt"), DemoOptions(out=tmp_path, progress=False), results)
    assert "nothing but silence" in out["skipped"] and "adaptation skipped" in capsys.readouterr().out
    assert results == {} and not (tmp_path / "adapted.pt").exists()


def test_adapt_cli_writes_a_checkpoint_eval_takes(window_run: Path, synth_shards: Path, synth_dev: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "adapted.pt"
    ckpt = str(_checkpoint(window_run))
    code, output = run_cli("adapt", "--checkpoint", ckpt, "--shards", str(synth_dev), "--train-shards",
                           str(synth_shards), "--out", str(out), "--rounds", "2", "--epochs", "1", "--device", "cpu")
    assert code == 0, output
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["rounds"]) == 2 and report["options"]["keep"] == 0.6 and f"wrote {out}" in output
    assert report["rounds"][0]["utterances_per_epoch"] == report["rounds"][0]["kept"] * 4  # 3 labelled per kept
    model, _ = model_from_checkpoint(out)
    payload, source = torch.load(out, weights_only=False), torch.load(ckpt, weights_only=False)
    assert payload["adapt"]["rounds"] == report["rounds"] and payload["adapted_from"] == ckpt
    assert (payload["step"], payload["epoch"]) == (source["step"], source["epoch"]) != (None, None)
    code, output = run_cli("eval", "--checkpoint", str(out), "--shards", str(synth_dev), "--report",
                           str(tmp_path / "e.json"))
    assert code == 0 and "WER" in output
    for args, message in [(["--out", str(tmp_path / "a.txt")], "a .pt file"),
                          (["--out", str(out), "--shards", str(tmp_path / "none")], "shard folder not found"),
                          (["--out", str(out), "--lm-weight", "1"], "go with --lm"),
                          (["--out", str(out), "--keep", "0"], "--keep")]:
        base = ["adapt", "--checkpoint", ckpt, "--shards", str(synth_dev)]
        code, output = run_cli(*base, *args)
        assert code == 2 and message in output and "Traceback" not in output, output


def test_the_cli_defaults_are_the_measured_options() -> None:
    from lmu_asr.cli_tools import adapt as adapt_cmd

    given = {p.name: p.default for p in adapt_cmd.params}
    expected = AdaptOptions()
    assert {k: given[k] for k in ("rounds", "epochs", "keep", "lr", "labelled_ratio", "seed")} == \
        {k: getattr(expected, k) for k in ("rounds", "epochs", "keep", "lr", "labelled_ratio", "seed")}


def test_unreadable_utterances_are_counted_and_skipped(window_run: Path, synth_dev: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_robustness import truncate

    out = tmp_path / "dev"
    shutil.copytree(synth_dev, out, ignore=shutil.ignore_patterns(".index-cache-*"))
    (tar,) = out.glob("*.tar")
    truncate(tar, int(tar.stat().st_size * 0.6))  # the last utterances' members are gone
    model, cfg = model_from_checkpoint(_checkpoint(window_run))
    report = adapt(model, cfg, ShardSet.open(out), torch.device("cpu"), QUICK, progress=False)
    total = len(ShardSet.open(synth_dev))
    assert 1 <= report["unreadable"] < total and report["utterances"] + report["unreadable"] == total
    assert f"{report['unreadable']} unreadable utterance(s)" in caplog.text
