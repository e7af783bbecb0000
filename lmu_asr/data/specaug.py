"""SpecAugment on the training device: batched masks from a few tensor ops, no per-utterance Python.

Applied to normalised features (so a masked value is the corpus mean, 0), inside the model's forward when it is in
training mode; its randomness comes from torch's global generator, which the trainer reseeds every step, so a
resumed run draws the same masks as an uninterrupted one. Time masks scale with each utterance's own length and
stay inside it; padding is never "augmented" into signal.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmu_asr.config import SpecAugmentConfig


class SpecAugment(nn.Module):
    def __init__(self, cfg: SpecAugmentConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        cfg = self.cfg
        if not cfg.enabled:
            return x
        B, T, F = x.shape
        dev = x.device
        freq = torch.arange(F, device=dev)[None, :]
        time = torch.arange(T, device=dev)[None, :]
        drop_f = torch.zeros(B, F, dtype=torch.bool, device=dev)
        for _ in range(cfg.freq_masks):
            width = torch.floor(torch.rand(B, device=dev) * (cfg.freq_width + 1))
            start = torch.floor(torch.rand(B, device=dev) * (F - width + 1))
            drop_f |= (freq >= start[:, None]) & (freq < (start + width)[:, None])
        drop_t = torch.zeros(B, T, dtype=torch.bool, device=dev)
        lens = lengths.to(torch.float32)
        max_width = torch.clamp(lens * cfg.time_width, max=float(cfg.time_width_max))
        for _ in range(cfg.time_masks):
            width = torch.floor(torch.rand(B, device=dev) * (max_width + 1))
            start = torch.floor(torch.rand(B, device=dev) * torch.clamp(lens - width + 1, min=1))
            drop_t |= (time >= start[:, None]) & (time < (start + width)[:, None])
        keep = ~(drop_f[:, None, :] | drop_t[:, :, None])
        return x * keep.to(x.dtype)
