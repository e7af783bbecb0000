"""Audio loading and the 80-dim log-mel fbank, shared by prep, transcribe, the demo and the benchmarks.

One definition of the features for the whole system: prep computes them offline into shards, ``transcribe``
computes them online for a single file, and both must agree bit for bit with each other. The extractor is lhotse's
Kaldi-compatible ``Fbank`` (25 ms Povey window, 10 ms hop, 80 mel bins, no dither, ``snip_edges=False``): measured
here it is faster than kaldi-native-fbank (``lmuasr bench prep`` keeps that comparison) and it *is* the reference.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
# The resampler's windowed sinc: zero crossings each side, cutoff as a share of the lower Nyquist, Kaiser beta.
RESAMPLER = {"zeros": 24, "rolloff": 0.95, "kaiser_beta": 8.6}


class AudioError(Exception):
    """Audio that cannot be used (unreadable, corrupt, empty); the message is one line for logs and reports."""


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = SAMPLE_RATE
    num_mel_bins: int = 80
    frame_length: float = 0.025
    frame_shift: float = 0.01
    extractor: str = "lhotse.Fbank"
    dither: float = 0.0
    snip_edges: bool = False
    resampler: str = "kaiser-sinc zeros=24 rolloff=0.95 beta=8.6"  # for audio not at sample_rate (resample())

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=8)
def _extractor(num_mel_bins: int, sample_rate: int, snip_edges: bool = False):  # noqa: ANN202 (lhotse type)
    import warnings

    from lhotse import Fbank, FbankConfig

    with warnings.catch_warnings():  # lhotse warns about snip_edges=True, which we only use on pre-padded blocks
        warnings.simplefilter("ignore", UserWarning)
        return Fbank(FbankConfig(num_filters=num_mel_bins, sampling_rate=sample_rate, dither=0.0,
                                 snip_edges=snip_edges))


def compute_fbank(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 80,
                  block_frames: int = 30_000) -> np.ndarray:
    """Log-mel fbank (frames, num_mel_bins) float32 of mono float32 samples at ``sample_rate``.

    Frames: round(samples / hop), as lhotse's ``snip_edges=False``. Long recordings (a GigaSpeech podcast runs
    for hours) are processed in blocks of ``block_frames`` so memory stays bounded (lhotse materialises every
    window at once: ~2 KB per frame). The blocks reproduce the one-shot result exactly: the signal is padded
    once the way lhotse pads it (reflection, (window - hop) / 2 samples on the left), then each block is a
    ``snip_edges=True`` extraction over its own span of the padded signal, windows included.
    """
    if samples.ndim != 1:
        raise ValueError("compute_fbank expects mono samples (1-D)")
    hop, win = round(0.01 * sample_rate), round(0.025 * sample_rate)
    if samples.size < win:  # not one analysis window: no frame to compute (lhotse fails with a storage error)
        raise AudioError(f"audio is too short: {1000 * samples.size / sample_rate:.1f} ms, at least "
                         f"{1000 * win / sample_rate:.0f} ms (one analysis window) is needed")
    x = samples.astype(np.float32, copy=False)
    total = (x.size + hop // 2) // hop
    if total <= block_frames or x.size < win:
        feats = _extractor(num_mel_bins, sample_rate).extract(x, sample_rate)
        return np.ascontiguousarray(feats, dtype=np.float32)
    left = (win - hop) // 2
    right = (total - 1) * hop + win - x.size - left
    padded = np.concatenate([x[:left][::-1], x, x[x.size - right:][::-1]])
    snip = _extractor(num_mel_bins, sample_rate, True)
    out = np.empty((total, num_mel_bins), dtype=np.float32)
    for a in range(0, total, block_frames):
        b = min(total, a + block_frames)
        out[a:b] = snip.extract(padded[a * hop:(b - 1) * hop + win], sample_rate)
    return out


def num_frames(duration: float, frame_shift: float = 0.01, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames lhotse (and we) assign to a span of ``duration`` seconds."""
    num_samples = round(duration * sample_rate)
    hop = round(frame_shift * sample_rate)
    return int((num_samples + hop // 2) // hop)


@lru_cache(maxsize=16)
def _resample_kernel(old: int, new: int) -> tuple[np.ndarray, int]:
    """(new, 2 * width + old) FIR taps: output phase j of each block of ``new`` samples from its input block."""
    zeros, rolloff, beta = RESAMPLER["zeros"], RESAMPLER["rolloff"], RESAMPLER["kaiser_beta"]
    cutoff = min(old, new) * rolloff
    width = math.ceil(zeros * old / cutoff)
    taps = np.arange(-width, width + old, dtype=np.float64)[None, :] / old  # input positions, in blocks
    phases = -np.arange(new, dtype=np.float64)[:, None] / new  # output positions within a block
    t = (phases + taps) * cutoff  # in zero crossings of the filter
    window = np.i0(beta * np.sqrt(np.clip(1 - (t / zeros) ** 2, 0, None))) / np.i0(beta) * (np.abs(t) <= zeros)
    kernel = np.sinc(t) * window * cutoff / old
    return kernel.astype(np.float32), width


def resample(samples: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE,
             chunk: int = 1 << 14) -> np.ndarray:
    """Band-limited resampling by a rational factor: a Kaiser-windowed sinc in polyphase form.

    Each block of ``old`` input samples gives ``new`` output samples (``old/new`` = the rates' reduced ratio),
    so the whole signal is one strided sliding-window matmul, done ``chunk`` blocks at a time: an hour-long
    podcast needs no more memory than a sentence. Why not lhotse's resampler (6 zero crossings, a Hann window,
    cutoff at 0.99 of Nyquist), which prep used before: upsampling 8 kHz audio, it leaves the mirror image of
    3.5 kHz speech at 4.5 kHz only 15 dB down (of 3.0 kHz: 44 dB), spectral content the speaker never made,
    squarely in the fbank's bins; downsampling 22.05 kHz, an 8.5 kHz tone aliases to 7.5 kHz 12 dB down. This
    one (24 zero crossings, cutoff at 0.95 of the lower Nyquist, Kaiser beta 8.6) keeps both under -90 dB up to
    3.7 kHz (for 8 kHz audio), passes 3.5 kHz at -0.1 dB and costs about the same per second of audio.
    ``examples/onnx_transcribe.py`` carries the same filter for clients without torch.
    """
    if source_rate == target_rate:
        return samples
    import torch

    g = math.gcd(int(source_rate), int(target_rate))
    old, new = int(source_rate) // g, int(target_rate) // g
    kernel, width = _resample_kernel(old, new)
    x = np.ascontiguousarray(samples, dtype=np.float32)
    n_out = math.ceil(new * x.size / old)
    blocks = math.ceil(n_out / new)
    padded = torch.from_numpy(np.pad(x, (width, width + old * (blocks + 1) - x.size)))
    k, taps = torch.from_numpy(kernel)[:, None, :], kernel.shape[1]
    out = torch.empty(blocks, new)
    with torch.no_grad():
        for a in range(0, blocks, chunk):
            b = min(blocks, a + chunk)
            span = padded[a * old:(b - 1) * old + taps][None, None]
            out[a:b] = torch.nn.functional.conv1d(span, k, stride=old)[0].T
    return out.reshape(-1)[:n_out].numpy()


def load_audio(source: str | Path | bytes, target_rate: int = SAMPLE_RATE,
               expected_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read any format soundfile knows (wav, flac, ogg/opus, mp3...) as mono float32 at ``target_rate``.

    Returns (samples, rate the file was decoded at). Multi-channel audio is averaged. Raises
    :class:`AudioError` with a one-line reason for unreadable or empty input. ``expected_rate`` is what the
    manifest claims: a mismatch (e.g. an opus decoder that returns 48 kHz) is logged once per rate pair and the
    audio is resampled to ``target_rate`` either way.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise AudioError(f"{name}: {'is a directory' if Path(source).is_dir() else 'no such file'}")
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else source
        data, rate = sf.read(fh, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AudioError(f"cannot decode {name}: {reason}") from None
    if data.size == 0:
        raise AudioError(f"{name} holds no samples")
    samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(samples).all():
        raise AudioError(f"{name} decodes to non-finite samples")
    if expected_rate is not None and rate != expected_rate:
        _warn_rate_once(rate, expected_rate)
    return resample(samples, rate, target_rate), int(rate)


@lru_cache(maxsize=32)
def _warn_rate_once(actual: int, expected: int) -> None:
    log.warning("audio decodes at %d Hz but the manifest says %d Hz: resampling to %d Hz", actual, expected,
                SAMPLE_RATE)
