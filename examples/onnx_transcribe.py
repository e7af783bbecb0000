#!/usr/bin/env python3
"""Transcribe audio files with an ``lmuasr export`` folder, without PyTorch and without lmu-asr.

    python examples/onnx_transcribe.py --model-dir EXPORT a.wav b.flac        # whole utterances (model.onnx)
    python examples/onnx_transcribe.py --model-dir EXPORT --streaming a.wav   # chunk by chunk (streaming.onnx)

Prints ``path<TAB>text`` per file like ``lmuasr transcribe`` (errors on stderr, exit 1 if any file failed), and
with ``--rtf`` the real-time factor (processing time over audio duration; ``--threads 1``: one CPU core).
Dependencies: numpy, onnxruntime, soundfile, kaldi-native-fbank. Features are prep's: 80-dim log-mel fbank with
the kaldi-native-fbank options in ``fbank.json`` (which make it agree with lhotse's Fbank), computed at 16 kHz;
other sample rates are first resampled by a Hann-windowed sinc filter (6 zero crossings, 0.99 roll-off), the
same design lmu-asr's loader uses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import onnxruntime as ort
import soundfile as sf

RATE = 16000


def resample(x: np.ndarray, rate: int, target: int = RATE, zeros: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Band-limited resampling: output phase j of each block of ``new`` samples is a windowed-sinc FIR over the
    input block, so the whole signal is one strided sliding-window matmul."""
    if rate == target:
        return x
    g = math.gcd(rate, target)
    old, new = rate // g, target // g
    cutoff = min(old, new) * rolloff
    width = math.ceil(zeros * old / cutoff)
    taps = np.arange(-width, width + old, dtype=np.float64)[None, :] / old  # input positions (in samples/old)
    phases = -np.arange(new, dtype=np.float64)[:, None] / new  # output positions within a block
    t = np.clip((phases + taps) * cutoff, -zeros, zeros)
    window = np.cos(t * math.pi / zeros / 2) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(math.pi * t) / (math.pi * t))
    kernel = (sinc * window * cutoff / old).astype(np.float32)  # (new, 2*width + old)
    padded = np.pad(x.astype(np.float32), (width, width + old))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::old]
    y = (frames @ kernel.T).reshape(-1)
    return y[: math.ceil(new * len(x) / old)]


def fbank(samples: np.ndarray, options: dict) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = options["sample_rate"]
    opts.frame_opts.frame_length_ms = options["frame_length_ms"]
    opts.frame_opts.frame_shift_ms = options["frame_shift_ms"]
    opts.frame_opts.dither = options["dither"]
    opts.frame_opts.snip_edges = options["snip_edges"]
    opts.frame_opts.window_type = options["window_type"]
    opts.frame_opts.preemph_coeff = options["preemph_coeff"]
    opts.frame_opts.remove_dc_offset = options["remove_dc_offset"]
    opts.frame_opts.round_to_power_of_two = options["round_to_power_of_two"]
    opts.mel_opts.num_bins = options["num_mel_bins"]
    opts.mel_opts.low_freq = options["low_freq"]
    opts.mel_opts.high_freq = options["high_freq"]
    opts.use_energy = options["use_energy"]
    opts.use_log_fbank = options["use_log_fbank"]
    opts.use_power = options["use_power"]
    opts.energy_floor = options["energy_floor"]
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(options["sample_rate"], samples.tolist())
    fb.input_finished()
    return np.array([fb.get_frame(i) for i in range(fb.num_frames_ready)], dtype=np.float32).reshape(-1, 80)


def load(path: str) -> np.ndarray:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    if data.size == 0:
        raise ValueError("no samples")
    return resample(data.mean(axis=1), rate)


def greedy(log_probs: np.ndarray, symbols: list[str]) -> str:
    ids = log_probs.argmax(-1)
    keep = (ids != 0) & np.r_[True, ids[1:] != ids[:-1]]
    text = "".join(" " if symbols[i] == "<space>" else symbols[i] for i in ids[keep])
    return " ".join(text.split())  # as lmuasr transcribe prints it: single spaces, none at the edges


def streaming_log_probs(sess: ort.InferenceSession, feats: np.ndarray, chunk: int, model: dict) -> np.ndarray:
    """The stream chunk by chunk; the state is every input after ``valid``, each output ``new_X`` its next value."""
    keep = model["attn_left"] if model["attention"] == "window" else None
    state = {}
    for i in sess.get_inputs()[2:]:
        shape = [1 if isinstance(d, str) or d is None else d for d in i.shape]
        if i.name.startswith(("key", "value")):
            shape[2] = 0  # an empty attention cache
        state[i.name] = np.zeros(shape, np.float32)
    if "norm_window_mean" in state:  # causal normalisation: the mean of the first window, known after it passed
        state["norm_window_mean"] = feats[: model["utterance_norm_window"]].mean(0, keepdims=True)
    pieces = []
    for start in range(0, len(feats), chunk):
        piece = feats[start:start + chunk]
        valid = len(piece)
        piece = np.pad(piece, ((0, chunk - valid), (0, 0)))[None]
        outs = sess.run(None, {"feats": piece, "valid": np.array([valid], np.int64), **state})
        pieces.append(outs[0][0, : (start + valid + 1) // 2 - start // 2])  # outputs of real frames only
        for meta, value in zip(sess.get_outputs()[1:], outs[1:], strict=True):
            name = meta.name.removeprefix("new_")
            trim = keep is not None and name.startswith(("key", "value"))
            state[name] = value[:, :, -keep:] if trim else value
    return np.concatenate(pieces)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--streaming", action="store_true", help="streaming.onnx, chunk by chunk")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: one core)")
    ap.add_argument("--rtf", action="store_true", help="print the real-time factor to stderr")
    ap.add_argument("files", nargs="+")
    return ap


def main() -> int:
    args = parser().parse_args()
    d = args.model_dir
    symbols = [line.split()[0] for line in (d / "tokens.txt").read_text().splitlines()]
    options = json.loads((d / "fbank.json").read_text())
    config = json.loads((d / "config.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = args.threads
    name = "streaming.onnx" if args.streaming else "model.onnx"
    if not (d / name).is_file():
        print(f"error: {d / name} not found (streaming needs a causal or window-attention model)", file=sys.stderr)
        return 2
    sess = ort.InferenceSession(str(d / name), so, providers=["CPUExecutionProvider"])
    model = config["config"]["model"]
    failed, busy, audio = 0, 0.0, 0.0
    for path in args.files:
        try:
            samples = load(path)
            t = time.perf_counter()
            feats = fbank(samples, options)
            if args.streaming:
                log_probs = streaming_log_probs(sess, feats, config["chunk_frames"], model)
            else:
                log_probs = sess.run(None, {"feats": feats[None], "lengths": np.array([len(feats)], np.int64)})[0][0]
            busy += time.perf_counter() - t
            audio += len(samples) / RATE
            print(f"{path}\t{greedy(log_probs, symbols)}")
        except Exception as err:  # one file's failure is reported and the others go on
            failed += 1
            print(f"error: {path}: {type(err).__name__}: {err}", file=sys.stderr)
    if args.rtf and audio:
        print(f"real-time factor {busy / audio:.4f} ({audio:.1f} s of audio, {args.threads} thread(s))",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
