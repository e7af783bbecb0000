"""``lmuasr export``: a checkpoint as ONNX models and plain files that run without PyTorch or this package.

``model.onnx`` (every model): ``feats`` (B, T, 80) raw log-mel fbank + ``lengths`` (B,) -> ``log_probs`` (B, T',
29) + ``out_lengths`` (B,), dynamic B and T. The feature normalisation is inside the graph. The LMU runs in its
``dft`` form (``LMULayer._dft``): ONNX has no FFT exporters can produce from torch.fft, and the chunked form loops
over a dynamic number of chunks; the DFT as cos/sin matmuls built from the sequence length is exact to ~1e-6.

``streaming.onnx`` (models with causal or window attention and no whole-utterance normalisation): one chunk of
``chunk_frames`` input frames and the whole state in, log-probs of the chunk and the new state out, every piece of
state an explicit tensor (as sherpa-onnx's streaming models): ``history`` (B, 2, 80), the last normalised input
frames the 2x downsampler needs (with ``model.freq_conv``: the frequency convolution's output for them, (B, 2,
out_dim)); per block ``lmu_state_i`` (B, C, order), the LMU memory; ``key_i``/``value_i`` (B, heads, P, head_dim),
the attention cache (P grows by chunk_frames/2 per chunk; window models keep the last ``attn_left`` frames, which
the client trims). ``valid`` (B,) says how many frames of the chunk are real: the
last chunk is zero-padded to the fixed size and its outputs past ceil(valid/2) are dropped by the client.

Plain files beside them: ``tokens.txt`` (id and symbol per line), ``normalization.json``, ``fbank.json`` (the
features, with the kaldi-native-fbank options that reproduce prep's lhotse Fbank), ``config.json`` and a README.
Export checks itself: onnxruntime against PyTorch on random input, offline and chunk by chunk.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmu_asr import UserError
from lmu_asr.fileio import atomic_write
from lmu_asr.model.asr import LMUASR
from lmu_asr.model.encoder import frame_mask
from lmu_asr.text import VOCAB

log = logging.getLogger(__name__)

FBANK = {"sample_rate": 16000, "num_mel_bins": 80, "frame_length_ms": 25.0, "frame_shift_ms": 10.0, "dither": 0.0,
         "snip_edges": False, "high_freq": -400.0, "low_freq": 20.0, "window_type": "povey", "preemph_coeff": 0.97,
         "remove_dc_offset": True, "round_to_power_of_two": True, "use_energy": False, "use_log_fbank": True,
         "use_power": True, "energy_floor": 1e-10, "note": "lhotse Fbank (prep) == kaldi-native-fbank with these"}


def _export_copy(model: LMUASR) -> LMUASR:
    m = copy.deepcopy(model).float().eval()
    for block in m.encoder.blocks:
        block.lmu.mode = "dft"
    return m


class OfflineGraph(nn.Module):
    def __init__(self, model: LMUASR) -> None:
        super().__init__()
        self.model = _export_copy(model)

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        logits, out_lengths = self.model(feats, lengths)
        return logits.log_softmax(-1), out_lengths


class StreamingGraph(nn.Module):
    """One chunk of a stream with the state passed in and out explicitly (see the module docstring)."""

    def __init__(self, model: LMUASR) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).float().eval()
        self.cfg = model.cfg
        self.causal_norm = model.cfg.utterance_norm == "causal"

    def forward(self, feats: Tensor, valid: Tensor, history: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        enc, n_blocks = self.model.encoder, len(self.model.encoder.blocks)
        norm: tuple[Tensor, ...] = ()
        live = frame_mask(valid, feats.shape[1])[..., None].float()
        if self.causal_norm:  # causal utterance normalisation (see LMUASR.causal_means): its sums are state too
            window_mean, total, seen, state = state[0], state[1], state[2], state[3:]
            x = (feats.float() - self.model.feat_mean) / self.model.feat_std
            csum = total[:, None, :] + torch.cumsum(x * live, dim=1)
            t = seen[:, None] + torch.arange(x.shape[1], device=x.device, dtype=x.dtype)[None, :]
            first = (window_mean - self.model.feat_mean) / self.model.feat_std  # the client's raw mean, normalised
            means = torch.where((t < self.cfg.utterance_norm_window)[..., None], first[:, None, :],
                                csum / (t + 1)[..., None])
            x = self.model.spectral(x - means) * live
            norm = (csum[:, -1], seen + valid.to(x.dtype))
        else:
            x = self.model.normalize(feats, valid)
        if enc.front is not None:  # the per-frame frequency convolution; frames past `valid` stay 0
            x = enc.front(x) * live
        lmu, keys, values = state[:n_blocks], state[n_blocks:2 * n_blocks], state[2 * n_blocks:]
        full = torch.cat([history, x], dim=1)
        new_history = full[:, -self.cfg.downsample:]
        h = enc.downsample.conv(full.transpose(1, 2)).transpose(1, 2)
        n = h.shape[1]
        new_lmu, new_keys, new_values = [], [], []
        for i, block in enumerate(enc.blocks):
            y, s = block.lmu.forward_chunk(block.norm_lmu(h), lmu[i])
            new_lmu.append(s)
            h = h + block.lmu_out(y)
            q, k, v = block.attn.project(block.norm_attn(h))
            k, v = torch.cat([keys[i], k], dim=2), torch.cat([values[i], v], dim=2)
            past = keys[i].shape[2]
            rel = torch.arange(k.shape[2], device=h.device)[None, :] - (torch.arange(n, device=h.device)[:, None]
                                                                        + past)
            allowed = rel <= 0
            if self.cfg.attention == "window":
                allowed = allowed & (rel >= -self.cfg.attn_left)
            h = h + block.attn.attend(q, k, v, allowed[None, None])
            if block.ffn is not None:
                h = h + block.ffn(block.norm_ffn(h))
            new_keys.append(k)
            new_values.append(v)
        log_probs = self.model.head(enc.norm(h)).log_softmax(-1)
        return (log_probs, new_history, *norm, *new_lmu, *new_keys, *new_values)

    def initial_state(self, batch: int = 1, past: int = 0) -> list[Tensor]:
        cfg, enc = self.cfg, self.model.encoder
        hd = cfg.d_model // cfg.n_heads
        out = [torch.zeros(batch, cfg.downsample, enc.downsample.conv.in_channels)]
        if self.causal_norm:
            out += [torch.zeros(batch, cfg.n_mels), torch.zeros(batch, cfg.n_mels), torch.zeros(batch)]
        out += [torch.zeros(batch, cfg.lmu_memory_dim, cfg.lmu_order) for _ in enc.blocks]
        out += [torch.zeros(batch, cfg.n_heads, past, hd) for _ in range(2 * len(enc.blocks))]
        return out

    def names(self) -> tuple[list[str], list[str]]:
        n = len(self.model.encoder.blocks)
        norm = ["norm_window_mean", "norm_total", "norm_seen"] if self.causal_norm else []
        state = norm + [f"lmu_state_{i}" for i in range(n)] + [f"key_{i}" for i in range(n)] + \
            [f"value_{i}" for i in range(n)]
        outputs = [f"new_{s}" for s in state if s != "norm_window_mean"]
        return ["feats", "valid", "history", *state], ["log_probs", "new_history", *outputs]


def can_stream(model: LMUASR) -> str | None:
    """Why this model cannot be exported for streaming, or None."""
    if model.cfg.attention == "full":
        return "full-context attention needs the whole utterance (train with model.attention=causal or window)"
    if model.cfg.utterance_norm not in ("none", "causal"):
        return "whole-utterance normalisation (model.utterance_norm=mean/meanvar) needs the whole utterance"
    return None


def _export(module: nn.Module, args: tuple, path: Path, names: tuple[list[str], list[str]],
            dynamic: dict[str, dict[int, Any]], varargs_from: int | None = None) -> None:
    """torch.onnx.export (dynamo); ``varargs_from``: where ``forward``'s ``*state`` starts in ``names[0]``."""
    import warnings

    shapes = [dynamic.get(n, {}) for n in names[0]]
    structure = tuple(shapes) if varargs_from is None else (*shapes[:varargs_from], tuple(shapes[varargs_from:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=names[0], output_names=names[1],
                                    dynamic_shapes=structure, verbose=False)
    atomic_write(path, program.model_proto.SerializeToString())


def export(model: LMUASR, cfg: Any, out: Path, chunk_frames: int = 32, check: bool = True) -> dict[str, Any]:
    """Write the export folder; returns what was written and the self-check's largest differences."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("lmuasr export needs onnx, onnxscript and onnxruntime: pip install 'lmu-asr[export]'") \
            from None
    if chunk_frames < 2 or chunk_frames % model.cfg.downsample:
        raise UserError(f"--chunk-frames must be a positive multiple of {model.cfg.downsample}")
    out.mkdir(parents=True, exist_ok=True)
    B, T = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("frames", min=8, max=200_000)
    offline = OfflineGraph(model)
    _export(offline, (torch.randn(2, 64, 80), torch.tensor([64, 40])), out / "model.onnx",
            (["feats", "lengths"], ["log_probs", "out_lengths"]),
            {"feats": {0: B, 1: T}, "lengths": {0: B}})
    written = ["model.onnx"]
    report: dict[str, Any] = {"files": written, "chunk_frames": chunk_frames}
    why = can_stream(model)
    if why is None:
        stream = StreamingGraph(model)
        names = stream.names()
        P = torch.export.Dim("past", min=0, max=1_000_000)
        state = stream.initial_state(2, past=6)
        dynamic = {"feats": {0: B}, "valid": {0: B}, "history": {0: B}}
        for name in names[0][3:]:
            dynamic[name] = {0: B, 2: P} if name.startswith(("key", "value")) else {0: B}
        _export(stream, (torch.randn(2, chunk_frames, 80), torch.tensor([chunk_frames, chunk_frames]), *state),
                out / "streaming.onnx", names, dynamic, varargs_from=3)
        written.append("streaming.onnx")
    else:
        report["streaming"] = f"not exported: {why}"
    _plain_files(model, cfg, out, chunk_frames, why)
    written += ["tokens.txt", "normalization.json", "fbank.json", "config.json", "README.md"]
    if check:
        report.update(self_check(model, out, chunk_frames))
    return report


def _plain_files(model: LMUASR, cfg: Any, out: Path, chunk_frames: int, why: str | None) -> None:
    symbols = ["<blank>", "<space>"] + list(VOCAB[2:])
    atomic_write(out / "tokens.txt", "".join(f"{s} {i}\n" for i, s in enumerate(symbols)))
    atomic_write(out / "normalization.json", json.dumps({"mean": model.feat_mean.tolist(),
                                                         "std": model.feat_std.tolist(),
                                                         "note": "applied inside the ONNX graphs"}, indent=1))
    atomic_write(out / "fbank.json", json.dumps(FBANK, indent=1))
    atomic_write(out / "config.json", json.dumps({"config": cfg.to_dict(), "chunk_frames": chunk_frames,
                                                  "streaming": why is None}, indent=1))
    streaming = (f"one chunk of {chunk_frames} frames + state in, log-probs + state out (lmu_asr/export.py)"
                 if why is None else f"not exported: {why}")
    atomic_write(out / "README.md", f"""# lmu-asr export

* `model.onnx`: `feats` (B, T, 80) float32 log-mel fbank (see `fbank.json`) + `lengths` (B,) int64 ->
  `log_probs` (B, ceil(T/2), 29) + `out_lengths` (B,). Normalisation is inside the graph.
* `streaming.onnx`: {streaming}.
* `tokens.txt`: CTC output ids (0 is the blank; `<space>` is a space). Greedy decoding: argmax per frame, merge
  repeats, drop blanks.
* `examples/onnx_transcribe.py` in the lmu-asr repository transcribes audio files with these files alone
  (numpy, onnxruntime, soundfile, kaldi-native-fbank).
""")


def self_check(model: LMUASR, out: Path, chunk_frames: int) -> dict[str, float]:
    """onnxruntime vs PyTorch: offline on random input of two lengths, and chunk by chunk over a whole stream."""
    import onnxruntime as ort

    from lmu_asr.infer import stream_logits

    torch.manual_seed(1)
    feats = torch.randn(2, 151, 80) * 3
    lengths = torch.tensor([151, 97])
    with torch.no_grad():
        ref, ref_lengths = OfflineGraph(model)(feats, lengths)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got, got_lengths = sess.run(None, {"feats": feats.numpy(), "lengths": lengths.numpy()})
    mask = frame_mask(ref_lengths, ref.shape[1]).numpy()
    result = {"offline_max_diff": float(np.abs(got - ref.numpy())[mask].max())}
    if not np.array_equal(got_lengths, ref_lengths.numpy()):
        raise UserError("export self-check failed: output lengths differ from PyTorch's")
    if (out / "streaming.onnx").is_file():
        one = feats[:1]
        with torch.no_grad():
            expected = stream_logits(model.eval(), one[0], chunk_frames).log_softmax(-1)[0].numpy()
        streamed = run_stream(out, one[0].numpy(), chunk_frames, model.cfg.attn_left
                              if model.cfg.attention == "window" else None)
        result["streaming_max_diff"] = float(np.abs(streamed - expected).max())
    worst = max(result.values())
    if worst > 1e-4:
        raise UserError(f"export self-check failed: onnxruntime differs from PyTorch by {worst:.2e} (> 1e-4)")
    return result


def run_stream(out: Path, feats: np.ndarray, chunk_frames: int, keep: int | None) -> np.ndarray:
    """Log-probs of one utterance through ``streaming.onnx``, chunk by chunk (what a live client does)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "streaming.onnx"), providers=["CPUExecutionProvider"])
    model = json.loads((out / "config.json").read_text())["config"]["model"]
    state = {}
    for i in sess.get_inputs()[2:]:
        shape = [1 if isinstance(d, str) or d is None else d for d in i.shape]
        if i.name.startswith(("key", "value")):
            shape[2] = 0  # an empty attention cache
        state[i.name] = np.zeros(shape, np.float32)
    if "norm_window_mean" in state:  # causal normalisation: the raw mean of the first window (the client waits for it)
        state["norm_window_mean"] = feats[: model["utterance_norm_window"]].mean(0, keepdims=True).astype(np.float32)
    pieces, total = [], feats.shape[0]
    for start in range(0, total, chunk_frames):
        chunk = feats[start:start + chunk_frames]
        valid = chunk.shape[0]
        chunk = np.pad(chunk, ((0, chunk_frames - valid), (0, 0)))[None].astype(np.float32)
        outs = sess.run(None, {"feats": chunk, "valid": np.array([valid], np.int64), **state})
        pieces.append(outs[0][0, : (start + valid + 1) // 2 - start // 2])
        for meta, value in zip(sess.get_outputs()[1:], outs[1:], strict=True):
            name = meta.name.removeprefix("new_")
            state[name] = value[:, :, -keep:] if keep is not None and name.startswith(("key", "value")) else value
    return np.concatenate(pieces, axis=0)
