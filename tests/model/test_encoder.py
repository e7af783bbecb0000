"""Streaming equals offline (where attention allows), autocast, and training with torch.compile on and off."""

from __future__ import annotations

import pytest
import torch

from lmu_asr.config import ModelConfig
from lmu_asr.model.asr import LMUASR, ctc_loss
from tests.model.test_asr import TINY


@pytest.mark.parametrize("attention,left", [("causal", 0), ("window", 6)])
@pytest.mark.parametrize("lmu_mode", ["fft", "memory"])
def test_streaming_chunks_equal_the_whole_utterance(attention: str, left: int, lmu_mode: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, "attention": attention, "attn_left": left, "lmu_mode": lmu_mode,
                         "ffn_dim": 48})
    model = LMUASR(cfg).eval()
    model.set_normalization(torch.randn(80), torch.rand(80) + 0.5)
    feats = torch.randn(2, 101, 80)  # odd length: the last stride is flushed at the end
    offline, out_lens = model(feats, torch.tensor([101, 101]))
    state = model.encoder.stream_init()
    pieces, t = [], 0
    for n in (1, 4, 17, 3, 30, 2, 44):
        pieces.append(model.stream(feats[:, t:t + n], state, final=(t + n == 101)))
        t += n
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, rtol=1e-4, atol=1e-4)


def test_full_attention_refuses_to_stream() -> None:
    model = LMUASR(TINY)
    with pytest.raises(ValueError, match="full-context attention"):
        model.encoder.stream_init()


def test_model_under_bf16_autocast_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = LMUASR(ModelConfig(**{**TINY.__dict__, "lmu_mode": "fft"})).eval()
    feats, lens = torch.randn(2, 60, 80), torch.tensor([60, 41])
    ref, _ = model(feats, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model(feats, lens)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 0.05, err


def test_training_steps_with_and_without_compile_agree() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, "n_blocks": 1})
    init = LMUASR(cfg).state_dict()
    x, lens = torch.randn(4, 48, 80), torch.tensor([48, 40, 31, 20])
    tgt, tlens = torch.randint(1, 29, (4, 6)), torch.tensor([6, 5, 3, 2])
    losses = {}
    for compiled in (False, True):
        model = LMUASR(cfg)
        model.load_state_dict(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        fwd = torch.compile(model) if compiled else model
        run = []
        for _ in range(4):
            loss = ctc_loss(*fwd(x, lens), tgt, tlens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[compiled] = run
    assert losses[False][-1] < losses[False][0]  # it learns
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.parametrize("layers", [1, 2])
def test_freq_conv_streams_pads_and_shifts_with_the_spectrum(layers: int) -> None:
    """model.freq_conv: streaming equals offline, batch padding changes nothing, and the filters are shared along
    frequency: a spectrum shifted up by ``freq_pool`` bins gives the same pooled outputs one position up (with two
    layers too: the second runs on bins pooled by 2, so the shift reaches it as whole bins)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, "attention": "causal", "freq_conv": 4, "freq_conv_kernel": 5,
                         "freq_pool": 4, "freq_conv_layers": layers})
    model = LMUASR(cfg).eval()
    model.set_normalization(torch.randn(80), torch.rand(80) + 0.5)
    feats = torch.randn(2, 61, 80)
    offline, _ = model(feats, torch.tensor([61, 40]))
    alone, _ = model(feats[1:, :40], torch.tensor([40]))
    torch.testing.assert_close(offline[1:, :20], alone, rtol=1e-4, atol=1e-4)
    state, pieces = model.encoder.stream_init(), []
    for start in range(0, 61, 9):
        pieces.append(model.stream(feats[:1, start:start + 9], state, final=start + 9 >= 61))
    torch.testing.assert_close(torch.cat(pieces, dim=1), offline[:1], rtol=1e-4, atol=1e-4)

    front = model.encoder.front
    x = torch.randn(1, 3, 80)
    shifted = torch.roll(x, 4, dims=2)
    a = front(x).view(1, 3, 4, 20)  # (B, T, channels, pooled positions)
    b = front(shifted).view(1, 3, 4, 20)
    m = layers  # away from the edges, where padding differs (two layers see 6 bins further)
    torch.testing.assert_close(b[..., 1 + m:-m], a[..., m:-1 - m])
