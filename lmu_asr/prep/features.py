"""Audio loading and the 80-dim log-mel fbank, shared by prep, transcribe, the demo and the benchmarks.

One definition of the features for the whole system: prep computes them offline into shards, ``transcribe``
computes them online for a single file, and both must agree bit for bit with each other. The extractor is lhotse's
Kaldi-compatible ``Fbank`` (25 ms Povey window, 10 ms hop, 80 mel bins, no dither, ``snip_edges=False``): measured
here it is faster than kaldi-native-fbank (``lmuasr bench prep`` keeps that comparison) and it *is* the reference.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000


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


def resample(samples: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling (lhotse's torch resampler, cached per rate pair)."""
    if source_rate == target_rate:
        return samples
    import torch
    from lhotse.augmentation import get_or_create_resampler

    resampler = get_or_create_resampler(int(source_rate), int(target_rate))
    with torch.no_grad():
        out = resampler(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None])
    return out[0].numpy()


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
