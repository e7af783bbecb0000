"""The resampler (prep, transcribe, the demo and the ONNX example): exact where the band allows, silent outside it.

References are analytic: a tone resampled must equal the same tone sampled at the new rate; an image or an alias
is measured as the energy at the frequency where nothing should be.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lmu_asr.prep.features import resample

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "onnx_transcribe.py"


def _tone(rate: int, freq: float, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)


def _amplitude(y: np.ndarray, rate: int, freq: float) -> float:
    """Amplitude of ``freq`` in ``y`` (interior only: the edges are zero-padded), by projection."""
    y = y[len(y) // 8: -len(y) // 8]
    n = np.arange(len(y))
    w = np.hanning(len(y))
    c = np.exp(-2j * np.pi * freq * n / rate)
    return float(2 * abs(np.sum(y * w * c)) / np.sum(w))


@pytest.mark.parametrize(("source", "target", "freq"), [(8000, 16000, 1000.0), (8000, 16000, 3300.0),
                                                        (22050, 16000, 7000.0), (48000, 16000, 440.0),
                                                        (44100, 16000, 5000.0), (16000, 8000, 3000.0)])
def test_a_tone_in_the_passband_is_the_same_tone_sampled_at_the_new_rate(source: int, target: int,
                                                                          freq: float) -> None:
    y = resample(_tone(source, freq), source, target)
    assert len(y) == int(np.ceil(target * source / source))  # ceil(new * n / old) samples, n = one second
    ref = _tone(target, freq)
    inner = slice(target // 10, -target // 10)  # away from the zero-padded edges
    assert np.abs(y[inner] - ref[inner]).max() < 0.02  # no delay, gain within 0.2 dB


def test_upsampling_leaves_no_image_and_downsampling_no_alias() -> None:
    # 8 kHz audio at 16 kHz: the mirror of 3.5 kHz speech would sit at 4.5 kHz (lhotse's filter: 15 dB down)
    for freq in (3000.0, 3500.0, 3700.0):
        y = resample(_tone(8000, freq), 8000, 16000)
        image = _amplitude(y, 16000, 8000 - freq)
        assert image < 1e-4 * _amplitude(y, 16000, freq), freq  # -80 dB
    # 22.05 kHz audio at 16 kHz: a tone above the new Nyquist must vanish, not fold to 16000 - f
    for freq in (8500.0, 9000.0, 10000.0):
        y = resample(_tone(22050, freq), 22050, 16000)
        assert _amplitude(y, 16000, 16000 - freq) < 1e-4 and np.sqrt(np.mean(y[2000:-2000] ** 2)) < 1e-3, freq


def test_chunked_resampling_equals_one_piece_and_handles_short_input() -> None:
    rng = np.random.default_rng(0)
    for source in (8000, 11025, 22050, 48000):
        x = rng.standard_normal(source + 37).astype(np.float32)
        whole = resample(x, source, 16000, chunk=1 << 20)
        assert np.allclose(resample(x, source, 16000, chunk=7), whole, atol=1e-5)
        assert len(whole) == -(-16000 * len(x) // source)
    assert len(resample(np.ones(3, dtype=np.float32), 44100, 16000)) == 2  # shorter than one filter: still works
    x = rng.standard_normal(100).astype(np.float32)
    assert resample(x, 16000, 16000) is x


def test_the_onnx_example_resamples_exactly_like_prep() -> None:
    """examples/onnx_transcribe.py cannot import lmu_asr: it carries the same filter, in numpy."""
    pytest.importorskip("kaldi_native_fbank")
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("onnx_example_resample", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    rng = np.random.default_rng(1)
    for source in (8000, 22050, 44100, 48000):
        x = rng.standard_normal(2 * source + 5).astype(np.float32)
        assert np.abs(example.resample(x, source) - resample(x, source)).max() < 1e-5, source
        assert np.abs(example.resample(x, source, chunk=5) - resample(x, source)).max() < 1e-5, source
