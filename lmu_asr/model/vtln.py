"""Speaker-level vocal-tract length normalisation at test time: one frequency warp per test speaker, chosen from
the model's own posteriors, with nothing retrained.

Why: on FSDD, every training-time lever measured (warps and perturbations, masks, regularisers, deeper front ends,
synthetic voices) moved the two hardest unheard voices in opposite directions. Choosing a warp per *test* speaker
is different in kind: it adapts the input to the model instead of the model to every voice, so a voice that needs
no warp keeps alpha = 1. The choice is the warp under which the model is most confident (the lowest mean entropy of
its frame posteriors over all of that speaker's utterances), the classic maximum-likelihood VTLN choice without a
transcript. It needs a speaker's utterances together, so it is a batch (``eval`` / ``demo``) decoder, not a
streaming one.

The warp is piecewise linear in Hz: ``f -> alpha * f`` up to a knee at 0.8 of the recordings' band edge, then
linear to the band edge, which stays where it is; bins above the band edge are left alone. Keeping the edge
matters: on 8 kHz recordings (FSDD) a warp that moved the 4 kHz edge made the chosen-warp WER worse than none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_WARPS = (0.92, 0.96, 1.0, 1.04, 1.08)
KNEE = 0.8  # of the band edge


def _mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def bin_centres(num_bins: int = 80, sample_rate: int = 16000, low_hz: float = 20.0,
                high_hz: float | None = None) -> np.ndarray:
    """Centre frequencies (Hz) of the Kaldi/lhotse mel bins our fbank uses (20 Hz to Nyquist - 400 Hz)."""
    high = sample_rate / 2 - 400.0 if high_hz is None else high_hz
    lo, hi = _mel(low_hz), _mel(high)
    centres = lo + (np.arange(num_bins) + 1) * (hi - lo) / (num_bins + 1)
    return 700.0 * np.expm1(centres / 1127.0)


def warp_matrix(alpha: float, band_edge_hz: float | None = None, num_bins: int = 80,
                sample_rate: int = 16000) -> Tensor:
    """(num_bins, num_bins) float32 M with ``feats @ M.T`` = the log-mel features read at warped frequencies.

    Output bin i takes the value at frequency h(f_i) by linear interpolation between the two neighbouring bins
    (on the mel axis): alpha > 1 reads higher frequencies, which shifts the spectrum down (a shorter vocal tract
    made to sound longer). ``band_edge_hz``: the recordings' upper band edge (half their sample rate); None, or
    anything above the top bin, means the whole axis.
    """
    f = bin_centres(num_bins, sample_rate)
    edge = float(f[-1]) if band_edge_hz is None else min(float(band_edge_hz), float(f[-1]))
    knee = KNEE * edge
    h = np.where(f <= knee, alpha * f, alpha * knee + (f - knee) * (edge - alpha * knee) / (edge - knee))
    h = np.where(f >= edge, f, h)
    # the centres are evenly spaced in mel, so a frequency's fractional bin is linear in its mel value (np.interp
    # also clamps to the first and last bin)
    pos = np.round(np.interp(_mel(h), _mel(f), np.arange(num_bins, dtype=np.float64)), 9)  # a bin that maps onto itself reads itself exactly (alpha = 1 is the identity)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, num_bins - 1)
    w = pos - i0
    m = np.zeros((num_bins, num_bins))
    np.add.at(m, (np.arange(num_bins), i0), 1.0 - w)
    np.add.at(m, (np.arange(num_bins), i1), w)
    return torch.tensor(m, dtype=torch.float32)


class Warped(torch.nn.Module):
    """A model whose input features are warped first: ``evaluate`` runs it like the model itself."""

    def __init__(self, model: torch.nn.Module, matrix: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("matrix", matrix.to(next(model.parameters()).device))
        self.train(model.training)  # evaluate() restores the wrapper's mode on the model: it must be the model's

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(feats @ self.matrix.to(feats.dtype).T, lengths)


def mean_neg_entropy(log_probs: np.ndarray) -> float:
    """Mean over frames of sum_k p log p: 0 for one-hot posteriors, lower the less sure the model is."""
    lp = np.asarray(log_probs, dtype=np.float64)
    return float((np.exp(lp) * lp).sum(-1).mean()) if len(lp) else 0.0


def choose_warps(scores: dict[float, Iterable[tuple[str, np.ndarray]]], speaker_of: dict[str, str]) -> dict[str, float]:
    """Speaker -> the warp whose posteriors are, on average over the speaker's utterances, the most confident.

    ``scores``: warp -> (key, log-probs) of every utterance decoded under it. Utterances with no speaker form one
    group of their own (""). Ties go to the warp closest to 1 (no warp when nothing is gained).
    """
    totals: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for alpha, rows in scores.items():
        for key, lp in rows:
            totals[speaker_of.get(key, "")][alpha].append(mean_neg_entropy(lp))
    chosen = {}
    for speaker, by_alpha in totals.items():
        ranked = sorted(by_alpha, key=lambda a: (-float(np.mean(by_alpha[a])), abs(a - 1.0)))
        chosen[speaker] = ranked[0]
    return chosen


def parse_warps(text: str) -> Sequence[float]:
    """'0.92,0.96,1,1.04,1.08' -> warps; 1.0 is always among them (a speaker may need none)."""
    try:
        warps = sorted({float(x) for x in text.split(",") if x.strip()} | {1.0})
    except ValueError:
        raise ValueError(f"warps must be comma-separated numbers, got {text!r}") from None
    if any(not 0.5 <= a <= 1.5 for a in warps):
        raise ValueError(f"warps must lie in [0.5, 1.5], got {text!r}")
    return warps


def warp_summary(chosen: dict[str, float]) -> str:
    """'george 1.08' for a few test speakers; for many, how many chose each warp."""
    if len(chosen) <= 6:
        return ", ".join(f"{s or '(no speaker)'} {a:g}" for s, a in chosen.items())
    counts: dict[float, int] = {}
    for a in chosen.values():
        counts[a] = counts.get(a, 0) + 1
    return f"{len(chosen)} speakers, " + ", ".join(f"{a:g} x{n}" for a, n in sorted(counts.items()))
