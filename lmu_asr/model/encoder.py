"""Encoder: causal 2x downsampling, then blocks of [LMU layer + multi-head self-attention] (pre-norm, residual).

Every component is causal except attention, whose context is a config choice:

* ``full``   — each frame attends to the whole (unpadded) utterance: best accuracy, offline only.
* ``causal`` — each frame attends to itself and everything before it: streams exactly, KV cache grows.
* ``window`` — itself and ``attn_left`` frames before: streams exactly with a bounded cache.

With ``causal``/``window`` the streaming path (:meth:`Encoder.stream`) reproduces the offline output frame for
frame, because the downsampling conv, the LMU and the per-frame layers are causal too. Padding at the end of a
batch never changes the output at valid frames (keys past the length are masked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lmu_asr.config import ModelConfig
from lmu_asr.model.lmu import LMULayer


def resolve_lmu_mode(cfg: ModelConfig) -> str:
    """"auto": materialise the memory when it is no larger than the hidden state, else fold it into the kernel."""
    if cfg.lmu_mode != "auto":
        return cfg.lmu_mode
    return "memory" if cfg.lmu_memory_dim * cfg.lmu_order <= cfg.lmu_hidden else "fft"


def frame_mask(lengths: Tensor, time: int) -> Tensor:
    """(B, time) bool, True on each row's first ``lengths[b]`` frames. The one definition of a real frame that
    padding, normalisation, decoding and the streaming export share, so that they cannot disagree at the edge."""
    return torch.arange(time, device=lengths.device)[None, :] < lengths[:, None]


def downsampled_lengths(lengths: Tensor, factor: int) -> Tensor:
    """Valid output frames after downsampling: ceil(length / factor). The CTC input lengths come from here."""
    return torch.div(lengths + factor - 1, factor, rounding_mode="floor")


class Downsample(nn.Module):
    """Causal strided conv: output t sees input frames [s·t - s, s·t + s - 1] (kernel 2s, stride s)."""

    def __init__(self, n_in: int, n_out: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv1d(n_in, n_out, kernel_size=2 * factor, stride=factor)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, n_in) -> (B, ceil(T/s), n_out)
        s = self.factor
        right = (-x.shape[1]) % s
        x = F.pad(x.transpose(1, 2), (s, right))
        return self.conv(x).transpose(1, 2)


class FreqConv(nn.Module):
    """Per-frame convolution along the mel axis, then max-pooling over neighbouring bins (``model.freq_conv``).

    Why: a speaker with a shorter vocal tract puts the same formants a few mel bins higher. A linear map of the 80
    bins (the downsampler alone) learns each formant at the bins the training voices put it; a shared filter bank
    slid along frequency and pooled over ``freq_pool`` bins answers the same for small shifts (the classical case
    for convolution over frequency in acoustic models). Per frame, so streaming stays exact.
    """

    def __init__(self, n_mels: int, channels: int, kernel: int, pool: int, layers: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, channels, kernel, padding=kernel // 2)
        # the second layer combines neighbouring filters' answers (a formant pattern, not one peak) on bins pooled
        # by 2; pooling the rest afterwards keeps the output size and the total shift tolerance of one layer
        self.conv2 = nn.Conv1d(channels, channels, 5, padding=2) if layers == 2 else None
        self.pool = pool if layers == 1 else pool // 2  # the last max-pool's width
        self.out_dim = channels * (n_mels // pool)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, n_mels) -> (B, T, out_dim)
        B, T, n = x.shape
        y = F.relu(self.conv(x.reshape(B * T, 1, n)))
        if self.conv2 is not None:
            y = F.relu(self.conv2(F.max_pool1d(y, 2)))
        return F.max_pool1d(y, self.pool).reshape(B, T, self.out_dim)


def attention_mask(lengths: Tensor, time: int, kind: str, left: int) -> Tensor:
    """Boolean mask (True = may attend), (B, 1, 1, T) for full attention, (B, 1, T, T) otherwise.

    Lengths are clamped to >= 1 so that an all-padding row (a dummy row that fills a static batch shape) still has
    one key and never produces NaN.
    """
    pos = torch.arange(time, device=lengths.device)
    keys = pos[None, :] < lengths.clamp(min=1)[:, None]  # (B, T)
    if kind == "full":
        return keys[:, None, None, :]
    rel = pos[None, :] - pos[:, None]  # [i, j] = j - i
    allowed = rel <= 0
    if kind == "window":
        allowed = allowed & (rel >= -left)
    return keys[:, None, None, :] & allowed[None, None]


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, H, T, Dh)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        B, H, T, Dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.project(x)
        return self.attend(q, k, v, mask)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int = 1024) -> None:
        super().__init__()
        self.norm_lmu = nn.LayerNorm(cfg.d_model)
        self.lmu = LMULayer(cfg.d_model, cfg.lmu_hidden, cfg.lmu_order, cfg.lmu_theta, cfg.lmu_memory_dim,
                            mode=resolve_lmu_mode(cfg), chunk=cfg.lmu_chunk, max_len=max_len)
        self.lmu_out = nn.Identity() if cfg.lmu_hidden == cfg.d_model else nn.Linear(cfg.lmu_hidden, cfg.d_model)
        self.norm_attn = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.ffn: nn.Module | None = None
        if cfg.ffn_dim > 0:
            self.norm_ffn = nn.LayerNorm(cfg.d_model)
            self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(cfg.ffn_dim, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.drop(self.lmu_out(self.lmu(self.norm_lmu(x))))
        x = x + self.drop(self.attn(self.norm_attn(x), mask))
        if self.ffn is not None:
            x = x + self.drop(self.ffn(self.norm_ffn(x)))
        return x


@dataclass
class StreamState:
    """Everything the encoder must remember between chunks of one stream (batch of streams)."""

    history: Tensor | None = None  # last 2s input frames already consumed by the downsampler
    leftover: Tensor | None = None  # input frames not yet forming a full stride
    lmu: list[Tensor | None] = field(default_factory=list)
    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)
    frames_out: int = 0
    norm_total: Tensor | None = None  # causal utterance normalisation: sum of the frames so far
    norm_seen: int = 0
    norm_pending: Tensor | None = None  # frames of the first window, held until it is complete


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, max_frames: int = 3000) -> None:
        super().__init__()
        self.cfg = cfg
        self.front: FreqConv | None = None
        if cfg.freq_conv:
            self.front = FreqConv(cfg.n_mels, cfg.freq_conv, cfg.freq_conv_kernel, cfg.freq_pool,
                                  cfg.freq_conv_layers)
        self.downsample = Downsample(self.front.out_dim if self.front else cfg.n_mels, cfg.d_model, cfg.downsample)
        max_len = -(-max_frames // cfg.downsample)  # the LMU's cached kernel covers every training bucket
        self.blocks = nn.ModuleList(Block(cfg, max_len) for _ in range(cfg.n_blocks))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, n_mels), zero beyond each length -> (B, T', d_model), output lengths (B,)."""
        if self.front is not None:  # padding frames stay exactly 0, as the streaming path pads them
            x = self.front(x) * frame_mask(lengths, x.shape[1])[..., None].to(x.dtype)
        h = self.downsample(x)
        out_lengths = downsampled_lengths(lengths, self.cfg.downsample)
        mask = attention_mask(out_lengths, h.shape[1], self.cfg.attention, self.cfg.attn_left)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only each block's input; recompute the rest in the backward (same dropout masks)
                h = torch.utils.checkpoint.checkpoint(block, h, mask, use_reentrant=False)
            else:
                h = block(h, mask)
        return self.norm(h), out_lengths

    # ---------------------------------------------------------------- streaming
    def stream_init(self) -> StreamState:
        if self.cfg.attention == "full":
            raise ValueError("this model uses full-context attention, which cannot stream exactly; train with "
                             "model.attention=causal or window for streaming")
        if self.cfg.utterance_norm not in ("none", "causal"):
            raise ValueError("this model normalises by whole-utterance statistics (model.utterance_norm), which "
                             "cannot stream; train with model.utterance_norm=causal or none for streaming")
        n = len(self.blocks)
        return StreamState(lmu=[None] * n, keys=[None] * n, values=[None] * n)

    @torch.no_grad()
    def stream(self, x: Tensor, state: StreamState, final: bool = False) -> Tensor:
        """Encode the next chunk x (B, n, n_mels) of a stream; returns the new output frames (B, n', d_model).

        With ``final=True`` a trailing odd frame is flushed (padded with a zero frame, as offline padding does).
        """
        s = self.cfg.downsample
        if self.front is not None:  # per frame: the history, leftover and final padding are in its output space
            x = self.front(x)
        if state.leftover is not None:
            x = torch.cat([state.leftover, x], dim=1)
            state.leftover = None
        usable = x.shape[1] - (0 if final else x.shape[1] % s)
        if usable < x.shape[1]:
            state.leftover = x[:, usable:]
        x = x[:, :usable]
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], 0, self.cfg.d_model)
        if final and x.shape[1] % s:
            x = F.pad(x, (0, 0, 0, s - x.shape[1] % s))
        hist = state.history if state.history is not None else x.new_zeros(x.shape[0], s, x.shape[2])
        full = torch.cat([hist, x], dim=1)
        state.history = full[:, -s:]
        h = self.downsample.conv(full.transpose(1, 2)).transpose(1, 2)
        n_new = h.shape[1]
        start = state.frames_out
        for i, block in enumerate(self.blocks):
            y, state.lmu[i] = block.lmu.forward_chunk(block.norm_lmu(h), state.lmu[i])
            h = h + block.lmu_out(y)
            q, k, v = block.attn.project(block.norm_attn(h))
            if state.keys[i] is not None:
                k = torch.cat([state.keys[i], k], dim=2)
                v = torch.cat([state.values[i], v], dim=2)
            past = k.shape[2] - n_new
            qpos = torch.arange(start, start + n_new, device=x.device)
            kpos = torch.arange(start - past, start + n_new, device=x.device)
            rel = kpos[None, :] - qpos[:, None]
            allowed = rel <= 0
            if self.cfg.attention == "window":
                allowed = allowed & (rel >= -self.cfg.attn_left)
            h = h + block.attn.attend(q, k, v, allowed[None, None])
            keep = k.shape[2] if self.cfg.attention == "causal" else self.cfg.attn_left
            state.keys[i], state.values[i] = k[:, :, -keep:], v[:, :, -keep:]
            if block.ffn is not None:
                h = h + block.ffn(block.norm_ffn(h))
        state.frames_out += n_new
        return self.norm(h)
