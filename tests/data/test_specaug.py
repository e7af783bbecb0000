"""SpecAugment: masks stay inside each utterance; the recording-floor augmentation against a plain reference."""

from __future__ import annotations

import numpy as np
import torch

from lmu_asr.config import ModelConfig, SpecAugmentConfig
from lmu_asr.data.specaug import SpecAugment
from lmu_asr.model.asr import LMUASR


def test_masks_zero_whole_bands_and_spans_inside_each_utterance() -> None:
    torch.manual_seed(0)
    aug = SpecAugment(SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=2, time_width=0.2))
    x = torch.randn(8, 50, 80) + 5.0  # no exact zeros before masking
    lengths = torch.tensor([50, 40, 30, 20, 10, 5, 2, 1])
    y = aug(x, lengths)
    masked = y == 0
    for i, n in enumerate(lengths.tolist()):
        rows, cols = masked[i, :n].all(1), masked[i, :n].all(0)
        # every zero belongs to a fully masked frame or a fully masked bin, and masks stay small
        assert bool((masked[i, :n] == (rows[:, None] | cols[None, :])).all())
        assert int(cols.sum()) <= 20 and int(rows.sum()) <= 2 * max(1, int(0.2 * n))
        assert not bool(masked[i, n:].all(1).any())  # time masks never fall in the padding


def test_recording_floor_matches_a_plain_reference_and_spares_padding() -> None:
    """Each utterance's energies become log(exp(x) + exp(peak - d ln10/10)), d ~ U[lo, hi] dB, over its valid
    frames; the draw is per utterance (recomputed here from the same generator state)."""
    cfg = SpecAugmentConfig(floor_db=(10.0, 40.0))
    aug = SpecAugment(cfg)
    x = torch.randn(3, 30, 80) * 3.0
    lengths = torch.tensor([30, 17, 4])
    torch.manual_seed(5)
    y = aug.raw(x, lengths)
    torch.manual_seed(5)
    depth = (10.0 + torch.rand(3) * 30.0).numpy()
    for i, n in enumerate(lengths.tolist()):
        xi = x[i, :n].double().numpy()
        level = xi.max() - depth[i] * np.log(10) / 10
        np.testing.assert_allclose(y[i, :n].numpy(), np.logaddexp(xi, level), rtol=1e-5, atol=1e-5)
        assert torch.equal(y[i, n:], x[i, n:])
    assert bool((y >= x).all())  # energy is only ever added
    assert torch.equal(SpecAugment(SpecAugmentConfig()).raw(x, lengths), x)  # off by default


def test_the_model_applies_the_floor_in_training_only() -> None:
    cfg = ModelConfig(d_model=32, n_blocks=1, n_heads=4, lmu_order=8, lmu_hidden=32, dropout=0.0)
    aug = SpecAugmentConfig(freq_masks=0, time_masks=0, floor_db=(0.0, 0.0))
    torch.manual_seed(1)
    plain = LMUASR(cfg, augment=SpecAugment(aug))
    floored = LMUASR(cfg, augment=SpecAugment(SpecAugmentConfig(freq_masks=0, time_masks=0, floor_db=(5.0, 5.0))))
    floored.load_state_dict(plain.state_dict())
    x = torch.randn(2, 20, 80) * 4.0
    lengths = torch.tensor([20, 12])
    with torch.no_grad():
        assert not torch.allclose(plain(x, lengths)[0], floored(x, lengths)[0])  # training mode: floor applied
        plain.eval()
        floored.eval()
        torch.testing.assert_close(plain(x, lengths)[0], floored(x, lengths)[0])  # evaluation: untouched


def test_tempo_stretch_matches_a_plain_interpolation_reference() -> None:
    """Each row becomes round(L * r) frames read at t * L / L' by linear interpolation (numpy's interp per bin);
    the padded length is ceil(T * exp(tempo)) whatever was drawn; padding and empty rows stay 0."""
    aug = SpecAugment(SpecAugmentConfig(tempo=0.3))
    T = 40
    x = torch.randn(5, T, 80) + 3.0
    lengths = torch.tensor([40, 33, 17, 2, 0])
    x[lengths[:, None] <= torch.arange(T)[None, :]] = 0.0
    torch.manual_seed(3)
    y, new = aug.stretch(x, lengths)
    assert y.shape == (5, int(np.ceil(T * np.exp(0.3))), 80)
    for i, (n, m) in enumerate(zip(lengths.tolist(), new.tolist(), strict=True)):
        if n == 0:
            assert m == 0 and not bool(y[i].any())
            continue
        assert round(n * np.exp(-0.3)) <= m <= round(n * np.exp(0.3))
        pos = np.minimum(np.arange(m) * n / m, n - 1)
        ref = np.stack([np.interp(pos, np.arange(n), x[i, :n, f].numpy()) for f in range(80)], axis=1)
        np.testing.assert_allclose(y[i, :m].numpy(), ref, rtol=1e-5, atol=1e-5)
        assert not bool(y[i, m:].any())


def test_tempo_draws_both_ways_and_is_off_by_default() -> None:
    aug = SpecAugment(SpecAugmentConfig(tempo=0.2))
    lengths = torch.full((400,), 100)
    torch.manual_seed(0)
    _, new = aug.stretch(torch.randn(400, 100, 4), lengths)
    assert 78 <= int(new.min()) < 90 and 110 < int(new.max()) <= 123  # exp(+-0.2): 82-122 frames
    assert 0.97 < float(new.float().log().sub(np.log(100)).exp().mean()) < 1.05  # log-uniform around 1
    x = torch.randn(2, 10, 80)
    y, n = SpecAugment(SpecAugmentConfig()).stretch(x, torch.tensor([10, 6]))
    assert y is x and n.tolist() == [10, 6]
