"""Deployment: lmuasr export (ONNX, offline and streaming with explicit state), the standalone example (no torch,
no lmu_asr), checkpoint averaging and lmuasr doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.helpers import ROOT, SHARED_DATA, read_transcripts, run_cli

pytest.importorskip("onnxruntime", reason="lmuasr export needs the export extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("kaldi_native_fbank", reason="the ONNX example computes features with kaldi-native-fbank")

EXAMPLE = ROOT / "examples" / "onnx_transcribe.py"
NO_TORCH = '''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "lmu_asr", "lhotse", "torchaudio"):
            raise ImportError(f"{name} is blocked: the example must run without it")
sys.meta_path.insert(0, Block())
'''


def run_example(tmp_path: Path, model_dir: Path, files: list[Path], *flags: str) -> dict[str, str]:
    """examples/onnx_transcribe.py in a fresh interpreter that cannot import torch or lmu_asr."""
    site = tmp_path / "no_torch"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--model-dir", str(model_dir), *flags,
                           *map(str, files)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(line.split("\t", 1) for line in proc.stdout.splitlines())


def transcribe(checkpoint: Path, files: list[Path], *flags: str) -> dict[str, str]:
    code, output = run_cli("transcribe", "--checkpoint", str(checkpoint), *flags, *map(str, files))
    assert code == 0, output
    return dict(line.split("\t", 1) for line in output.splitlines() if "\t" in line)


def speech_files(tmp_path: Path, n: int = 6) -> list[Path]:
    """Real speech (AN4, 16 kHz, and FSDD, 8 kHz: the resampler too) where ../shared is present, else eSpeak."""
    files = []
    for corpus in ("an4_70", "fsdd"):
        if (SHARED_DATA / corpus / "transcripts.tsv").is_file():
            files += [SHARED_DATA / corpus / r["path"] for r in read_transcripts(SHARED_DATA / corpus)[: n // 2]]
    if not files:
        from lmu_asr.prep.synth import SynthSpec, synthetic_utterances

        for u in synthetic_utterances(SynthSpec(xs=n, dev=0, test=0, seed=4)):
            files.append(tmp_path / f"{u.utt_id}.wav")
            sf.write(files[-1], u.audio, 16000)
    return files


def test_export_streaming_model_and_the_example_agree_with_transcribe(window_run: Path, tmp_path: Path) -> None:
    ck = window_run / "checkpoints" / "last.pt"
    out = tmp_path / "export"
    code, output = run_cli("export", "--checkpoint", str(ck), "--out", str(out), "--chunk-frames", "24")
    assert code == 0, output
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "streaming.onnx", "tokens.txt", "normalization.json",
                                               "fbank.json", "config.json", "README.md"}
    assert "streaming within" in output
    tokens = (out / "tokens.txt").read_text().splitlines()
    assert tokens[0] == "<blank> 0" and tokens[1] == "<space> 1" and tokens[-1] == "Z 28"
    files = speech_files(tmp_path)
    offline = transcribe(ck, files)
    assert run_example(tmp_path, out, files) == offline
    streaming = transcribe(ck, files, "--streaming", "--chunk-frames", "24")
    assert run_example(tmp_path, out, files, "--streaming") == streaming
    assert streaming == offline  # a window-attention model streams exactly
    assert any(offline.values())  # it does say something, so equality means something


def test_full_attention_model_exports_offline_only(tiny_run: Path, tmp_path: Path) -> None:
    code, output = run_cli("export", "--checkpoint", str(tiny_run / "checkpoints" / "last.pt"), "--out",
                           str(tmp_path / "e"))
    assert code == 0 and "not exported: full-context attention" in output
    assert (tmp_path / "e" / "model.onnx").is_file() and not (tmp_path / "e" / "streaming.onnx").exists()
    code, output = run_cli("export", "--checkpoint", str(tiny_run / "checkpoints" / "last.pt"), "--out",
                           str(tmp_path / "e"), "--chunk-frames", "5")
    assert code == 2 and "multiple of 2" in output


def test_average_of_the_last_checkpoints(window_run: Path, tmp_path: Path) -> None:
    code, output = run_cli("average", "--run", str(window_run), "--last", "3", "--out", str(tmp_path / "avg.pt"))
    assert code == 0, output
    states = [torch.load(window_run / "checkpoints" / f"checkpoint_epoch_{e}.pt", weights_only=True) for e in (3, 4, 5)]
    avg = torch.load(tmp_path / "avg.pt", weights_only=True)
    name = "head.weight"
    torch.testing.assert_close(avg["model"][name], sum(s["model"][name] for s in states) / 3)
    assert avg["averaged_from"][-1].endswith("checkpoint_epoch_5.pt")
    files = speech_files(tmp_path, 2)
    assert len(transcribe(tmp_path / "avg.pt", files)) == len(files)  # transcribe takes it
    code, output = run_cli("export", "--checkpoint", str(tmp_path / "avg.pt"), "--out", str(tmp_path / "e"))
    assert code == 0, output
    code, output = run_cli("average", "--run", str(window_run), "--last", "60")
    assert code == 2 and "needs 60" in output


def test_doctor_reports_every_check(tmp_path: Path) -> None:
    code, output = run_cli("doctor", "--quick", "--json", "--path", str(tmp_path), "--min-free-gb", "0")
    checks = {c["name"]: c for c in json.loads(output)}
    assert code == 0 and checks["Python"]["status"] == "ok" and checks["soundfile"]["status"] == "ok"
    assert {"PyTorch", "pyarrow", "lhotse", "webdataset", "/dev/shm", "open files", f"disk {tmp_path}"} <= set(checks)
    code, output = run_cli("doctor", "--quick", "--path", str(tmp_path), "--min-free-gb", "1e9")
    assert code == 1 and "✗ disk" in output and "fix:" in output


def test_example_features_match_prep(tmp_path: Path) -> None:
    """kaldi-native-fbank with fbank.json's options, after the example's resampler, against prep's features."""
    import importlib.util

    from lmu_asr.export import FBANK
    from lmu_asr.prep.features import compute_fbank, load_audio

    spec = importlib.util.spec_from_file_location("onnx_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    rng = np.random.default_rng(0)
    for rate in (16000, 8000, 22050):
        t = np.arange(int(rate * 1.3)) / rate
        audio = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        sf.write(tmp_path / f"x{rate}.wav", audio, rate, subtype="FLOAT")
        ours = example.fbank(example.load(str(tmp_path / f"x{rate}.wav")), FBANK)
        ref = compute_fbank(load_audio(tmp_path / f"x{rate}.wav")[0])
        assert ours.shape == ref.shape and np.abs(ours - ref).max() < 2e-3, rate


def test_causal_normalisation_streams_in_onnx(tmp_path: Path) -> None:
    """A model with causal utterance normalisation (a lifter, a frequency convolution) exports streaming.onnx (the first window's mean
    is the client's); the self-check compares it chunk by chunk with PyTorch, and the example runs it."""
    from lmu_asr.config import load_config
    from lmu_asr.model.asr import LMUASR
    from lmu_asr.train.checkpoint import atomic_save, checkpoint_payload

    cfg = load_config("cpu-tiny", None, {"model.attention": "causal", "model.utterance_norm": "causal",
                                         "model.utterance_norm_window": 30,
                                         "model.lifter": 20,  # the lifter's projection is in the graph too
                                         "model.freq_conv": 4,  # so is the frequency convolution,
                                         "model.freq_conv_layers": 2})  # both of its layers (a speech folder's)
    torch.manual_seed(0)
    model = LMUASR(cfg.model)
    atomic_save(checkpoint_payload(model, cfg), tmp_path / "ck.pt")
    code, output = run_cli("export", "--checkpoint", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "e"),
                           "--chunk-frames", "16")
    assert code == 0 and "streaming within" in output, output
    files = speech_files(tmp_path, 2)
    assert set(run_example(tmp_path, tmp_path / "e", files, "--streaming")) == {str(f) for f in files}
