"""SpecAugment on the training device: batched masks (and an optional frequency warp) from a few tensor ops.

Applied to normalised features (so a masked value is the corpus mean, 0), inside the model's forward when it is in
training mode; its randomness comes from torch's global generator, which the trainer reseeds every step, so a
resumed run draws the same masks as an uninterrupted one. Time masks scale with each utterance's own length and
stay inside it; padding is never "augmented" into signal.
"""

from __future__ import annotations

import math

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
        if cfg.freq_warp > 0:
            x = self.warp(x, cfg.freq_warp)
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

    def raw(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """Augmentations of the raw log-mel energies (before any normalisation): the recording floor.

        Recordings differ in how far their quiet parts lie below the speech (noise, microphone, gain staging):
        17-32 dB between FSDD's speakers, measured. A model trained on a few recordings learns their floors; raising
        each utterance's floor to a random depth below its peak (log(exp(x) + exp(level)), energy added evenly to
        every bin) makes the floor uninformative."""
        lo, hi = self.cfg.floor_db
        if not self.cfg.enabled or hi <= 0:
            return feats
        x = feats.float()
        valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[..., None]
        peak = torch.where(valid, x, torch.full_like(x, -1e4)).amax(dim=(1, 2))
        depth = lo + torch.rand(x.shape[0], device=x.device) * (hi - lo)
        level = peak - depth * (math.log(10) / 10)  # dB -> natural-log energy units (lhotse's fbank)
        return torch.where(valid, torch.logaddexp(x, level[:, None, None]), x)

    @property
    def changes_lengths(self) -> bool:
        """Whether training draws new utterance lengths (``tempo``): the train step must then give the CTC the
        model's output lengths, not the loader's host copies."""
        return self.cfg.enabled and self.cfg.tempo > 0

    def stretch(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Speaking-rate perturbation: each utterance's frames resampled to ``round(L * r)`` frames,
        r = exp(U[-tempo, tempo]) (linear interpolation between neighbouring frames); the new lengths come back.

        Speakers differ in speaking rate (FSDD's five say a digit in 0.35-0.52 s on average). Speed perturbation
        changes the rate together with pitch and formants; this changes only the rate, on the features, at no cost
        in the data pipeline. It draws from torch's global generator like the masks (reseeded every step). The
        padded length becomes ``ceil(T * exp(tempo))`` whatever was drawn, so a batch's shape is still a function
        of its bucket (one compiled graph per bucket); rows of length 0 (empty or damaged) stay empty."""
        if not self.changes_lengths:
            return feats, lengths
        width = self.cfg.tempo
        B, T2 = feats.shape[0], math.ceil(feats.shape[1] * math.exp(width))
        rate = torch.exp((torch.rand(B, device=feats.device) * 2 - 1) * width)
        new = torch.where(lengths > 0, torch.round(lengths * rate).clamp(min=1), 0).to(lengths.dtype)
        t = torch.arange(T2, device=feats.device, dtype=torch.float32)[None, :]
        last = (lengths - 1).clamp(min=0)[:, None]
        # frame t of the new utterance reads the old one at t * L / L' (the last frame maps at most to the last)
        pos = torch.minimum(t * (lengths / new.clamp(min=1)).to(torch.float32)[:, None], last.to(torch.float32))
        out = _interpolate(feats, 1, pos, last)
        return out * (t < new[:, None]).to(out.dtype)[..., None], new

    @staticmethod
    def warp(x: Tensor, width: float) -> Tensor:
        """Resample each utterance's mel axis at f * alpha, alpha ~ U[1-width, 1+width] (linear interpolation,
        edges held): a cheap stand-in for vocal-tract length perturbation, one gather for the whole batch."""
        B, _, F = x.shape
        alpha = 1.0 + (torch.rand(B, device=x.device) * 2 - 1) * width
        pos = (torch.arange(F, device=x.device, dtype=torch.float32)[None, :] * alpha[:, None]).clamp(max=F - 1)
        return _interpolate(x, 2, pos, torch.tensor(F - 1, device=x.device))


def _interpolate(x: Tensor, dim: int, pos: Tensor, last: Tensor) -> Tensor:
    """``x`` (B, T, F) read at fractional positions ``pos`` (B, N) along ``dim`` (1: time, 2: frequency), the
    same positions for every index of the other axis, by linear interpolation between neighbours; ``last``: the
    highest index a neighbour may have (per row, or one for all). One gather per neighbour for the whole batch."""
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, last)
    w = (pos - lo).to(x.dtype).unsqueeze(3 - dim)
    shape = list(x.shape)
    shape[dim] = pos.shape[1]
    take = lambda idx: x.gather(dim, idx.unsqueeze(3 - dim).expand(shape))  # noqa: E731
    return take(lo) * (1 - w) + take(hi) * w
