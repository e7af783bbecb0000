"""The CTC model: lengths, padding, loss conventions, blank-bias behaviour on real speech, compile, FLOPs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmu_asr.config import ModelConfig, load_config
from lmu_asr.model.asr import LMUASR, count_flops, ctc_loss
from lmu_asr.model.decode import greedy_decode
from lmu_asr.text import encode
from tests.helpers import read_transcripts

TINY = ModelConfig(d_model=32, n_blocks=2, n_heads=4, lmu_order=16, lmu_theta=30.0, lmu_hidden=32,
                   lmu_memory_dim=2, dropout=0.0)


def padded_batch(feats: list[torch.Tensor], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(f.shape[0] for f in feats)
    x = torch.full((len(feats), T, feats[0].shape[1]), pad_value)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x, torch.tensor([f.shape[0] for f in feats])


@pytest.mark.parametrize("attention", ["full", "causal", "window"])
def test_output_lengths_and_padding_invariance(attention: str) -> None:
    torch.manual_seed(0)
    model = LMUASR(ModelConfig(**{**TINY.__dict__, "attention": attention, "attn_left": 5})).eval()
    lengths = [37, 20, 9, 1]
    feats = [torch.randn(n, 80) for n in lengths]
    x, lens = padded_batch(feats, pad_value=7.0)  # junk padding: must not matter
    logits, out_lens = model(x, lens)
    assert out_lens.tolist() == [math.ceil(n / 2) for n in lengths]  # not the padded length
    assert logits.shape[1] == math.ceil(37 / 2)
    for i, f in enumerate(feats):  # each utterance alone gives the same logits at its valid frames
        alone, n_out = model(f[None], torch.tensor([f.shape[0]]))
        torch.testing.assert_close(logits[i, : n_out[0]], alone[0], rtol=1e-4, atol=1e-4)


def test_input_bins_and_utterance_norm() -> None:
    torch.manual_seed(1)
    model = LMUASR(ModelConfig(**{**TINY.__dict__, "input_bins": 60, "utterance_norm": "meanvar",
                                  "attention": "causal"})).eval()
    model.set_normalization(torch.randn(80), torch.rand(80) + 0.5)
    feats = [torch.randn(23, 80), torch.randn(11, 80)]
    x, lens = padded_batch(feats, pad_value=3.0)
    logits, out_lens = model(x, lens)
    changed = [f.clone() for f in feats]
    for f in changed:
        f[:, 60:] = torch.randn(f.shape[0], 20) * 100  # out-of-band bins: ignored
        f += torch.randn(80)  # a constant per-utterance offset (a channel): removed by the utterance mean
        f[:, :60] = (f[:, :60] - f[:, :60].mean(0)) * 2.5 + f[:, :60].mean(0)  # a gain: removed by the variance
    y, _ = padded_batch(changed, pad_value=-9.0)
    torch.testing.assert_close(model(y, lens)[0], logits, rtol=1e-4, atol=1e-4)
    for i, f in enumerate(feats):  # still independent of the batch and its padding
        alone, n = model(f[None], torch.tensor([f.shape[0]]))
        torch.testing.assert_close(logits[i, : n[0]], alone[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="utterance_norm"):
        model.encoder.stream_init()  # a whole-utterance mean cannot stream: refused, not silently different


@pytest.mark.parametrize("window", [1, 16, 100])
def test_causal_utterance_norm_is_the_mean_of_the_past_and_streams(window: int) -> None:
    """Frame t subtracts the mean of frames 0..max(t, W-1) (all of a shorter utterance), computed here plainly;
    a stream (which waits for the first window) gives the offline logits, and a padded batch the unpadded ones."""
    torch.manual_seed(2)
    cfg = ModelConfig(**{**TINY.__dict__, "utterance_norm": "causal", "utterance_norm_window": window,
                         "attention": "window", "attn_left": 12})
    model = LMUASR(cfg).eval()
    model.set_normalization(torch.randn(80), torch.rand(80) + 0.5)
    feats = torch.randn(57, 80) * 3 + 2
    g = (feats - model.feat_mean) / model.feat_std
    expected = torch.stack([g[t] - g[: min(max(t, window - 1), 56) + 1].mean(0) for t in range(57)])
    torch.testing.assert_close(model.normalize(feats[None], torch.tensor([57]))[0], expected, rtol=1e-5, atol=1e-5)
    offline, _ = model(feats[None], torch.tensor([57]))
    state, pieces = model.encoder.stream_init(), []
    for start in range(0, 57, 10):
        pieces.append(model.stream(feats[None, start:start + 10], state, final=start + 10 >= 57))
    torch.testing.assert_close(torch.cat(pieces, 1), offline, rtol=1e-4, atol=1e-4)
    x, lens = padded_batch([feats, feats[:30]], pad_value=5.0)
    batch, _ = model(x, lens)
    torch.testing.assert_close(batch[1, :15], model(feats[None, :30], torch.tensor([30]))[0][0], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("input_bins", [0, 60])
def test_lifter_keeps_the_spectral_envelope_and_streams(input_bins: int) -> None:
    """model.lifter projects each normalised frame onto its lowest DCT-II components (scipy's orthonormal DCT is
    the reference): a time-varying ripple of higher order (a voice's pitch harmonics) changes no logit, a change
    of the envelope does, and streaming still equals offline."""
    from scipy.fft import dct

    from lmu_asr.model.asr import lifter_matrix

    torch.manual_seed(3)
    cfg = ModelConfig(**{**TINY.__dict__, "lifter": 12, "input_bins": input_bins, "attention": "causal",
                         "utterance_norm_window": 8})
    bins = input_bins or 80
    basis = torch.tensor(dct(np.eye(bins), norm="ortho", axis=0), dtype=torch.float32)  # rows: cosines
    expected = torch.zeros(80, 80)
    expected[:bins, :bins] = basis[:12].T @ basis[:12]
    projection = lifter_matrix(cfg)
    torch.testing.assert_close(projection, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(projection @ projection, projection, rtol=0, atol=1e-5)
    assert lifter_matrix(TINY).numel() == 0  # off by default: no projection at all

    model = LMUASR(cfg).eval()
    model.set_normalization(torch.randn(80), torch.rand(80) + 0.5)
    feats = torch.randn(41, 80) * 2
    logits, _ = model(feats[None], torch.tensor([41]))
    ripple = torch.randn(41, 1) * (basis[30] + 0.5 * basis[45])  # orders >= 12, varying over time
    rippled = feats.clone()
    rippled[:, :bins] += ripple * model.feat_std[:bins]
    rippled[:, bins:] += torch.randn(41, 80 - bins) * 50  # out of band, if any: ignored
    torch.testing.assert_close(model(rippled[None], torch.tensor([41]))[0], logits, rtol=1e-4, atol=1e-4)
    moved = feats.clone()
    moved[:, :bins] += torch.randn(41, 1) * basis[3] * model.feat_std[:bins]  # a formant-like change
    assert (model(moved[None], torch.tensor([41]))[0] - logits).abs().max() > 1e-2
    state, pieces = model.encoder.stream_init(), []
    for start in range(0, 41, 7):
        pieces.append(model.stream(feats[None, start:start + 7], state, final=start + 7 >= 41))
    torch.testing.assert_close(torch.cat(pieces, 1), logits, rtol=1e-4, atol=1e-4)


def reference_ctc(logits: torch.Tensor, out_lens: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Each utterance on its own, unpadded, through F.ctc_loss; then the mean of loss/target_length."""
    losses = []
    for i, tgt in enumerate(targets):
        lp = logits[i, : out_lens[i]].float().log_softmax(-1)[:, None]
        loss = F.ctc_loss(lp, torch.tensor([tgt]), out_lens[i: i + 1], torch.tensor([len(tgt)]),
                          reduction="sum", zero_infinity=True)
        losses.append(loss / len(tgt))
    return torch.stack(losses).mean()


def test_ctc_loss_conventions() -> None:
    torch.manual_seed(1)
    B, T, V = 4, 30, 29
    logits = torch.randn(B, T, V, requires_grad=True)
    out_lens = torch.tensor([30, 22, 15, 9])
    targets = [[5, 6, 7, 8, 9], [3, 3, 4], [10] * 2, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]  # last: too long
    lens = torch.tensor([len(t) for t in targets])
    concat = torch.tensor([s for t in targets for s in t])
    # padded form with random labels in the padding: they must never enter the loss
    padded = torch.randint(1, V, (B, max(lens)))
    for i, t in enumerate(targets):
        padded[i, : len(t)] = torch.tensor(t)
    loss_concat = ctc_loss(logits, out_lens, concat, lens)
    loss_padded = ctc_loss(logits, out_lens, padded, lens)
    assert torch.isfinite(loss_concat)  # zero_infinity: the impossible utterance contributes 0, not inf
    torch.testing.assert_close(loss_concat, loss_padded)
    torch.testing.assert_close(loss_concat, reference_ctc(logits, out_lens, targets), rtol=1e-5, atol=1e-5)
    # the gradient through our static-shape custom op equals autograd through F.ctc_loss
    (g_ours,) = torch.autograd.grad(loss_padded, logits)
    (g_ref,) = torch.autograd.grad(reference_ctc(logits, out_lens, targets), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)
    # padding frames past out_lens get no gradient
    assert g_ours[3, 9:].abs().max() == 0


def test_ctc_loss_is_fp32_under_autocast_and_ignores_empty_rows() -> None:
    logits = torch.randn(3, 20, 29).bfloat16()
    out_lens, tgt = torch.tensor([20, 20, 20]), torch.tensor([[4, 5, 0], [6, 0, 0], [0, 0, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ctc_loss(logits, out_lens, tgt, torch.tensor([2, 1, 0]))
    assert loss.dtype == torch.float32
    expected = ctc_loss(logits[:2].float(), out_lens[:2], tgt[:2], torch.tensor([2, 1]))
    torch.testing.assert_close(loss, expected)  # a zero-length (dummy) row does not change the mean


def test_blank_bias_is_applied() -> None:
    model = LMUASR(ModelConfig(**{**TINY.__dict__, "blank_bias": 2.5}))
    assert model.head.bias[0].item() == 2.5 and model.head.bias[1:].abs().max().item() == 0


def test_train_step_compiles_without_graph_breaks() -> None:
    model = LMUASR(TINY).train()

    def step(x: torch.Tensor, lens: torch.Tensor, tgt: torch.Tensor, tlens: torch.Tensor) -> torch.Tensor:
        logits, out_lens = model(x, lens)
        return ctc_loss(logits, out_lens, tgt, tlens)

    x = torch.randn(3, 40, 80)
    explanation = torch._dynamo.explain(step)(x, torch.tensor([40, 33, 12]), torch.randint(1, 29, (3, 6)),
                                              torch.tensor([6, 4, 2]))
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_flop_count_matches_analytic_estimate() -> None:
    cfg = ModelConfig(**{**TINY.__dict__, "lmu_mode": "memory"})
    model = LMUASR(cfg)
    B, T = 2, 64
    Tp, d, C, o, h = T // 2, cfg.d_model, cfg.lmu_memory_dim, cfg.lmu_order, cfg.lmu_hidden
    n = 2 * Tp  # FFT length
    fft = lambda transforms: 2.5 * transforms * n * math.log2(n)  # noqa: E731
    per_block = (2 * B * Tp * (d * C + C * o * h + d * h + 3 * d * d + d * d)  # linears
                 + 4 * B * Tp * Tp * d  # QK^T and AV
                 + fft(B * C) + fft(o) + fft(B * C * o))  # rfft(u), rfft(H), irfft(memory)
    expected = 2 * B * Tp * (cfg.n_mels * 4) * d + cfg.n_blocks * per_block + 2 * B * Tp * d * cfg.vocab_size
    assert count_flops(model, B, T, backward=False) == pytest.approx(expected, rel=1e-3)
    step = count_flops(model, B, T, backward=True)
    assert 2.5 * expected < step < 3.5 * expected
    # the frequency convolution: K-tap filters on every input frame's bins (4 filters pooled by 4 give 80 features
    # again, so the downsampler's count is unchanged)
    front = LMUASR(ModelConfig(**{**cfg.__dict__, "freq_conv": 4, "freq_conv_kernel": 5, "freq_pool": 4}))
    conv = 2 * B * T * 4 * 5 * cfg.n_mels
    assert count_flops(front, B, T, backward=False) == pytest.approx(expected + conv, rel=1e-3)


def digit_sequences(fsdd, count: int, seed: int) -> tuple[list[torch.Tensor], list[str]]:  # noqa: ANN001
    """Utterances of 3-7 real spoken digits (FSDD recordings concatenated): long enough for CTC's blank plateau."""
    from lmu_asr.prep.features import compute_fbank, load_audio

    rows = read_transcripts(fsdd)[::3][:600]
    audio = [load_audio(fsdd / r["path"])[0] for r in rows]
    rng = np.random.default_rng(seed)
    feats, texts = [], []
    for _ in range(count):
        pick = rng.choice(len(rows), rng.integers(3, 8))
        feats.append(torch.from_numpy(compute_fbank(np.concatenate([audio[j] for j in pick]))))
        texts.append(" ".join(rows[j]["text"] for j in pick))
    return feats, texts


def test_fresh_model_leaves_the_all_blank_state_on_real_speech(fsdd) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    feats, texts = digit_sequences(fsdd, 300, seed=0)
    stats = torch.cat(feats)
    cfg = load_config("cpu-tiny").model
    model = LMUASR(cfg)
    model.set_normalization(stats.mean(0), stats.std(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    held_out = list(range(268, 300))

    def batch(idx: list[int]) -> tuple[torch.Tensor, ...]:
        x, lens = padded_batch([feats[i] for i in idx])
        tg = [encode(texts[i]) for i in idx]
        tgt = torch.zeros(len(idx), max(map(len, tg)), dtype=torch.long)
        for j, t in enumerate(tg):
            tgt[j, : len(t)] = torch.tensor(t)
        return x, lens, tgt, torch.tensor([len(t) for t in tg])

    def emitted_fraction() -> float:
        x, lens, _, tlens = batch(held_out)
        model.eval()
        with torch.no_grad():
            hyps = greedy_decode(*model(x, lens))
        model.train()
        return sum(map(len, hyps)) / tlens.sum().item()

    assert emitted_fraction() < 0.05  # the default blank bias starts it blank-dominant
    rng = np.random.default_rng(0)
    for step in range(1, 81):
        x, lens, tgt, tlens = batch(rng.choice(268, 16, replace=False).tolist())
        loss = ctc_loss(*model(x, lens), tgt, tlens)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, step / 50)
        opt.step()
    # within 80 steps it emits most of the held-out labels (measured: ~90 %; all-blank would be 0)
    assert emitted_fraction() > 0.5


def test_time_cumsum_op_matches_torch_cumsum_compiled_with_gradient() -> None:
    """The opaque cumsum that compiled CUDA graphs use (inductor's split scan fails there): value and gradient."""
    from lmu_asr.model.asr import _time_cumsum

    x = torch.randn(3, 50, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 50, 8, dtype=torch.float64)
    compiled = torch.compile(lambda t: (_time_cumsum(t) * w).sum(), fullgraph=True)
    (g_ours,) = torch.autograd.grad(compiled(x), x)
    (g_ref,) = torch.autograd.grad((torch.cumsum(x, 1) * w).sum(), x)
    torch.testing.assert_close(_time_cumsum(x), torch.cumsum(x, 1))
    torch.testing.assert_close(g_ours, g_ref)


def test_ctc_lengths_go_to_a_device_kernel_as_host_lists() -> None:
    """torch 2.11's CUDA CTC rejects host length tensors: they are handed over as int lists (no device read)."""
    from lmu_asr.model.asr import _host_lengths_arg

    lens = torch.tensor([5, 3])
    assert _host_lengths_arg(lens, torch.device("cuda")) == [5, 3]
    assert _host_lengths_arg(lens, torch.device("cpu")) is lens
    log_probs = torch.randn(6, 2, 29).log_softmax(-1)
    tg = torch.tensor([[3, 4], [5, 0]])
    a = torch.ops.aten._ctc_loss(log_probs, tg, [6, 4], [2, 1], 0, True)[0]
    b = torch.ops.aten._ctc_loss(log_probs, tg, torch.tensor([6, 4]), torch.tensor([2, 1]), 0, True)[0]
    torch.testing.assert_close(a, b)  # both overloads compute the same loss
