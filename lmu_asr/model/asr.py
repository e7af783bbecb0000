"""The LMU-attention CTC model: feature normalisation, encoder, CTC head, and a CTC loss that is done right.

CTC details the seed got wrong, each pinned by a test:

* the CTC input lengths are the utterance lengths *after* downsampling (``ceil(T/2)``), not the padded length;
* targets are concatenated per utterance with their true lengths, so padding never enters the loss;
* the loss is computed in float32 (log-softmax included) even under bf16/fp16 autocast, with
  ``zero_infinity`` (an utterance too short for its transcript contributes 0, not inf) and averaged as
  sum_i(loss_i / target_len_i) / n, the mean over target lengths;
* the blank logit's bias is initialised from ``ModelConfig.blank_bias`` (see :func:`init_output_bias`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmu_asr.config import ModelConfig
from lmu_asr.model.encoder import Encoder, frame_mask
from lmu_asr.text import BLANK

if TYPE_CHECKING:  # for the annotation only: the model runs without the data package
    from lmu_asr.data.specaug import SpecAugment


class LMUASR(nn.Module):
    """fbank (B, T, 80) + lengths -> CTC logits (B, ceil(T/2), 29) + output lengths."""

    def __init__(self, cfg: ModelConfig, augment: SpecAugment | None = None, max_frames: int = 3000) -> None:
        super().__init__()
        self.cfg = cfg
        self.augment = augment  # SpecAugment, in training mode only
        # Per-feature statistics from prep (meta.json); stored in the checkpoint so inference needs nothing else.
        self.register_buffer("feat_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("feat_std", torch.ones(cfg.n_mels))
        # the spectral-envelope projection (model.lifter): a function of the config, so not stored in checkpoints
        self.register_buffer("envelope", lifter_matrix(cfg), persistent=False)
        self.encoder = Encoder(cfg, max_frames)  # max_frames: the longest input trained on (sizes caches)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        init_output_bias(self.head, cfg.blank_bias)

    def set_normalization(self, mean: Tensor | list[float], std: Tensor | list[float]) -> None:
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-3)
        if mean_t.shape != self.feat_mean.shape or std_t.shape != self.feat_std.shape:
            raise ValueError(f"normalisation statistics must have {self.cfg.n_mels} values")
        self.feat_mean.copy_(mean_t)
        self.feat_std.copy_(std_t)

    def normalize(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """Global mean/variance normalisation; frames past each length are set to exactly 0 (so batch padding and
        single-utterance padding look the same to the causal downsampler)."""
        x = (feats.float() - self.feat_mean) / self.feat_std
        valid = frame_mask(lengths, x.shape[1])[..., None].to(x.dtype)
        if self.cfg.utterance_norm == "causal":
            x = x - self.causal_means(x, lengths)[0]
        elif self.cfg.utterance_norm != "none":  # whole-utterance statistics: not for streaming
            n = lengths.clamp(min=1)[:, None, None].to(x.dtype)
            x = x - (x * valid).sum(1, keepdim=True) / n
            if self.cfg.utterance_norm == "meanvar":
                # floor: a bin that is near-constant in this utterance is not blown up to unit variance
                x = x * torch.rsqrt(((x * x * valid).sum(1, keepdim=True) / n).clamp(min=0.1))
        return self.spectral(x) * valid

    def spectral(self, x: Tensor) -> Tensor:
        """Per-frame frequency shaping of normalised features: ``input_bins`` and ``lifter`` (both per frame, so
        streaming and offline stay equal).

        Bins above the recording's bandwidth hold only codec and resampler noise, which is specific to a channel,
        not to speech; ``input_bins`` zeroes them. ``lifter`` keeps only the spectral envelope (see
        :func:`lifter_matrix`)."""
        if self.envelope.numel():
            return x @ self.envelope
        if self.cfg.input_bins:
            x = x * (torch.arange(x.shape[2], device=x.device) < self.cfg.input_bins).to(x.dtype)
        return x

    def causal_means(self, x: Tensor, lengths: Tensor, total: Tensor | None = None, seen: int = 0
                     ) -> tuple[Tensor, Tensor]:
        """Causal utterance normalisation: the mean that frame t subtracts, and the new running total.

        Frame t uses the mean of frames 0..max(t, W-1) (W = ``utterance_norm_window``; an utterance shorter than W
        uses all of it): the first W frames share the mean of the first window, later frames the mean of everything
        up to them. So a stream waits for W frames (1 s) once, at its start, then runs with no lookahead, and gives
        exactly the offline result. ``total``/``seen``: the sum and count of the frames of earlier chunks (a
        stream whose first window has passed)."""
        window = self.cfg.utterance_norm_window
        T = x.shape[1]
        valid = frame_mask(lengths, T)[..., None].to(x.dtype)
        csum = time_cumsum(x * valid)
        if total is not None:
            csum = csum + total[:, None, :]
        t = torch.arange(T, device=x.device)[None, :] + seen
        upto = torch.maximum(t, torch.full_like(t, window - 1))
        upto = torch.minimum(upto, (lengths[:, None] + seen - 1).clamp(min=0)) - seen  # within what has been seen
        means = torch.gather(csum, 1, upto.clamp(min=0)[..., None].expand(-1, -1, x.shape[2]))
        means = means / (upto + seen + 1).clamp(min=1)[..., None].to(x.dtype)
        return means, csum[torch.arange(x.shape[0], device=x.device), (lengths - 1).clamp(min=0)]

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        augment = self.augment if self.training else None
        if augment is not None:  # raw energies first (rate, recording floor), masks on the normalised features
            feats, lengths = augment.stretch(feats, lengths)
            feats = augment.raw(feats, lengths)
        x = self.normalize(feats, lengths)
        if augment is not None:
            x = augment(x, lengths)
        h, out_lengths = self.encoder(x, lengths)
        return self.head(h), out_lengths

    @torch.no_grad()
    def stream(self, feats: Tensor, state, final: bool = False) -> Tensor:  # noqa: ANN001 (StreamState)
        """Streaming logits for the next chunk of features (see Encoder.stream)."""
        n = torch.full((feats.shape[0],), feats.shape[1], device=feats.device)
        if self.cfg.utterance_norm == "causal":
            x = self._causal_stream(feats, state, final)
            if x is None:  # still inside the first normalisation window: nothing to emit yet
                return feats.new_zeros(feats.shape[0], 0, self.head.out_features)
        else:
            x = self.normalize(feats, n)
        h = self.encoder.stream(x, state, final=final)
        return self.head(h)

    def _causal_stream(self, feats: Tensor, state, final: bool) -> Tensor | None:  # noqa: ANN001 (StreamState)
        """The causal normalisation of a stream: buffer the first window, then the running mean (see causal_means)."""
        x = (feats.float() - self.feat_mean) / self.feat_std
        if state.norm_total is None:  # the first window has not passed yet: wait for it (or for the end)
            state.norm_pending = x if state.norm_pending is None else torch.cat([state.norm_pending, x], dim=1)
            if state.norm_pending.shape[1] < self.cfg.utterance_norm_window and not final:
                return None
            x, state.norm_pending = state.norm_pending, None
            seen, total = 0, None
        else:
            seen, total = state.norm_seen, state.norm_total
        lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
        means, state.norm_total = self.causal_means(x, lengths, total, seen)
        state.norm_seen = seen + x.shape[1]
        return self.spectral(x - means)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lifter_matrix(cfg: ModelConfig) -> Tensor:
    """(n_mels, n_mels) projection onto the lowest ``cfg.lifter`` cosine components (DCT-II) of each frame's
    log-mel spectrum, over its first ``input_bins`` bins (all if 0; the rest become 0); empty when lifter is 0.

    Why: the fine structure of a log-mel frame (the harmonics of the voice's pitch, resolved by the narrow low
    mel filters) says who speaks; the envelope (formants) says what is said. With few training voices a model
    learns the voices' harmonics; projecting onto the envelope, as MFCCs truncated to 13-20 coefficients do, takes
    that away from it. The projection is symmetric and idempotent, and keeps the 80-bin input shape."""
    if not cfg.lifter:
        return torch.zeros(0, 0)
    bins = cfg.input_bins or cfg.n_mels
    n = torch.arange(bins, dtype=torch.float64)
    k = torch.arange(min(cfg.lifter, bins), dtype=torch.float64)
    dct = torch.cos(math.pi / bins * (n[None, :] + 0.5) * k[:, None]) * math.sqrt(2.0 / bins)
    dct[0] /= math.sqrt(2.0)  # orthonormal rows
    out = torch.zeros(cfg.n_mels, cfg.n_mels, dtype=torch.float64)
    out[:bins, :bins] = dct.T @ dct
    return out.float()


def init_output_bias(head: nn.Linear, blank_bias: float) -> None:
    """Zero the output biases and set the blank's to ``blank_bias``.

    A fresh CTC model is pulled towards emitting blank everywhere (blank is in every alignment) and must then
    climb out of that all-blank state. Starting with blank at ~50 % (bias ≈ log 28 = 3.3) skips the descent into
    it, and the model leaves it sooner and converges faster. Measured on 3-7-digit sequences of real FSDD
    speech (cpu-tiny model, 2 seeds, held-out CTC loss after 200 steps): bias +3 → 0.13/0.15, 0 → 0.24/0.27,
    -3 → 0.42/0.73. ``tests/model/test_asr.py`` pins that the default starts blank-dominant and leaves the
    all-blank state within a fixed number of steps on real speech.
    """
    with torch.no_grad():
        head.bias.zero_()
        head.bias[BLANK] = blank_bias


def time_cumsum(x: Tensor) -> Tensor:
    """Cumulative sum over time (dim 1), as ATen computes it.

    Compiled for CUDA, inductor (torch 2.11) turns a long cumsum over a non-innermost axis into a split scan whose
    code generation fails (``InductorError: list indices must be integers ...``, seen on an H200 at 96 x 400 and
    100 x 3000 frames); inside a compiled CUDA graph the sum therefore goes through an opaque custom op, which
    runs ATen's cumsum kernel and keeps the graph whole. Eager code, CPU inductor and ONNX export use
    ``torch.cumsum`` itself (the op has no ONNX translation)."""
    if x.device.type == "cuda" and torch.compiler.is_compiling():
        return _time_cumsum(x)
    return torch.cumsum(x, dim=1)


@torch.library.custom_op("lmu_asr::time_cumsum", mutates_args=())
def _time_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, dim=1)


@_time_cumsum.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _time_cumsum_backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
    # d/dx_s of sum_{s<=t} x_s: the reversed cumulative sum of the incoming gradient
    return _time_cumsum(grad.flip(1)).flip(1)


torch.library.register_autograd("lmu_asr::time_cumsum", _time_cumsum_backward)


def _host_lengths_arg(lengths: Tensor, device: torch.device) -> Tensor | list[int]:
    """CTC lengths as ATen wants them: host tensors become int lists for a CUDA kernel.

    torch 2.11's CUDA ``_ctc_loss.Tensor`` overload requires its lengths on the device (seen on an H200); its
    int-list overload takes them from the host, which is where the loader has them, so no device read happens."""
    return lengths.tolist() if lengths.device.type == "cpu" and device.type != "cpu" else lengths


@torch.library.custom_op("lmu_asr::ctc_loss_and_grad", mutates_args=())
def _ctc_loss_and_grad(log_probs: Tensor, targets: Tensor, input_lengths: Tensor,
                       target_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Per-utterance CTC loss and its gradient w.r.t. log_probs, computed together by ATen's own kernels.

    ATen's CTC op has a data-dependent output shape, which makes torch.compile break the graph; wrapped as an
    opaque custom op with a static-shape fake, the whole train step compiles as one graph and the numerics are
    exactly those of ``F.ctc_loss``.
    """
    aten = torch.ops.aten
    input_lengths = _host_lengths_arg(input_lengths, log_probs.device)  # type: ignore[assignment]
    target_lengths = _host_lengths_arg(target_lengths, log_probs.device)  # type: ignore[assignment]
    nll, log_alpha = aten._ctc_loss(log_probs, targets, input_lengths, target_lengths, BLANK, True)
    grad = aten._ctc_loss_backward(torch.ones_like(nll), log_probs, targets, input_lengths, target_lengths, nll,
                                   log_alpha, BLANK, True)
    return torch.where(torch.isinf(nll), torch.zeros_like(nll), nll), grad.contiguous()


@_ctc_loss_and_grad.register_fake
def _(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> tuple[Tensor, Tensor]:
    return log_probs.new_empty(log_probs.shape[1]), log_probs.new_empty(log_probs.shape)


def _ctc_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(output[1])


def _ctc_backward(ctx, grad_losses: Tensor, _grad_grad: Tensor):  # noqa: ANN001, ANN202
    (grad,) = ctx.saved_tensors
    return grad * grad_losses[None, :, None], None, None, None


torch.library.register_autograd("lmu_asr::ctc_loss_and_grad", _ctc_backward, setup_context=_ctc_setup)


@torch.library.custom_op("lmu_asr::ctc_loss_and_grad_triton", mutates_args=())
def _ctc_loss_and_grad_triton(log_probs: Tensor, targets: Tensor, input_lengths: Tensor,
                              target_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """The same as ``lmu_asr::ctc_loss_and_grad`` from our Triton kernels, lengths on the device: no host copy,
    so no synchronisation and nothing that stops a CUDA graph of the whole step (``lmu_asr.model.ctc_triton``)."""
    from lmu_asr.model.ctc_triton import ctc_loss_and_grad

    nll, grad = ctc_loss_and_grad(log_probs, targets, input_lengths, target_lengths, BLANK)
    return torch.where(torch.isinf(nll), torch.zeros_like(nll), nll), grad


@_ctc_loss_and_grad_triton.register_fake
def _(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> tuple[Tensor, Tensor]:
    return log_probs.new_empty(log_probs.shape[1]), log_probs.new_empty(log_probs.shape)


torch.library.register_autograd("lmu_asr::ctc_loss_and_grad_triton", _ctc_backward, setup_context=_ctc_setup)


def ctc_loss(logits: Tensor, out_lengths: Tensor, targets: Tensor, target_lengths: Tensor,
             host_out_lengths: Tensor | None = None, host_target_lengths: Tensor | None = None,
             impl: str = "aten") -> Tensor:
    """Mean over utterances of CTC loss / target length, in float32; rows with target length 0 are ignored.

    ``targets`` holds each utterance's labels with its true length in ``target_lengths``: either concatenated
    (1-D, no padding at all) or as a (B, S) matrix whose entries past each length are ignored by CTC. The train
    step uses the matrix form because its shape is static (one compiled graph per bucket).

    ``host_out_lengths`` / ``host_target_lengths``: the same lengths as CPU tensors. ATen's CTC kernels take
    their lengths on the host; given device tensors they copy them to the host first, which waits for the device
    (4 blocking copies per step). The train step passes the host copies the loader already has.

    ``impl="triton"`` (training with a (B, S) target matrix): our Triton kernels, which take the device lengths
    and ignore the host copies. ATen's CUDA kernels still copy their int-list lengths to the device, blocking, 3
    times in the forward and 3 in the backward; see :func:`lmu_asr.model.ctc_triton.ctc_loss_and_grad`.
    """
    in_lengths = out_lengths if host_out_lengths is None else host_out_lengths
    tl = target_lengths if host_target_lengths is None else host_target_lengths
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
        if impl == "triton" and torch.is_grad_enabled() and log_probs.requires_grad and targets.dim() == 2:
            losses = _ctc_loss_and_grad_triton(log_probs, targets, out_lengths, target_lengths)[0]
        elif torch.is_grad_enabled() and log_probs.requires_grad:
            losses = _ctc_loss_and_grad(log_probs, targets, in_lengths, tl)[0]
        else:
            lens = (_host_lengths_arg(in_lengths, log_probs.device), _host_lengths_arg(tl, log_probs.device))
            losses = F.ctc_loss(log_probs, targets, *lens, blank=BLANK, reduction="none",  # type: ignore[arg-type]
                                zero_infinity=True)
        valid = target_lengths > 0
        per_utt = losses / target_lengths.clamp(min=1).to(losses.dtype)
        return torch.where(valid, per_utt, torch.zeros_like(per_utt)).sum() / valid.sum().clamp(min=1)


def _fft_flops(x_shape, dim, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001 (flop-counter signature)
    """Real FFT of length N: ~2.5 N log2 N flops per transform (half a complex one), times the batch of
    transforms. Registered for aten._fft_r2c / _fft_c2r, which FlopCounterMode does not count by itself."""
    n = 1
    for d in dim:
        n *= max(int(x_shape[d]), int(out_shape[d]))
    transforms = math.prod(int(s) for s in x_shape) // math.prod(int(x_shape[d]) for d in dim)
    return int(2.5 * transforms * n * math.log2(max(n, 2)))


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    """QK^T and PV: the convention torch uses for its CUDA attention kernels (the CPU kernel is not registered)."""
    b, h, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * sq * sk * (d + dv)


def _sdpa_cpu_backward_flops(g_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    """dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: twice the forward (torch's convention, no recompute)."""
    return 2 * _sdpa_cpu_flops(q_shape, k_shape, v_shape)


def count_flops(model: nn.Module, batch: int, frames: int, backward: bool = True) -> int:
    """FLOPs of one training step (forward + backward) or forward only, for (batch, frames) of fbank input.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, convs, attention) plus an FFT estimate,
    so MFU is computed from what the implementation actually executes.
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {aten._fft_r2c: _fft_flops, aten._fft_c2r: _fft_flops,
              aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
              aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}
    device = next(model.parameters()).device
    feats = torch.randn(batch, frames, model.cfg.n_mels, device=device)
    lengths = torch.full((batch,), frames, device=device)
    was_training = model.training
    model.train(backward)
    try:
        with FlopCounterMode(display=False, custom_mapping=custom) as counter:
            logits, out_lengths = model(feats, lengths)
            if backward:
                logits.float().sum().backward()
        return int(counter.get_total_flops())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
