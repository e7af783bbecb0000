"""CTC decoding: batched greedy on the device, and a CTC prefix beam search in log space.

The prefix beam search keeps, for every label prefix, the probability of all alignments of the frames so far that
collapse to it, split into those ending in blank (p_b) and in a label (p_nb); prefixes reached by different
alignments are merged, so with an unpruned beam the result is the exact maximum of the total (summed over
alignments) label-sequence probability. ``prefix_scorer`` is the hook for word-level scoring (an LM, a lexicon, an
insertion bonus): it returns a log-score for a whole prefix that is added when ranking, never to the acoustic sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lmu_asr.model.encoder import frame_mask
from lmu_asr.text import BLANK, decode_ids

NEG_INF = -math.inf
PrefixScorer = Callable[[tuple[int, ...]], float]


def greedy_decode(logits: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best path: argmax per frame, collapse repeats, drop blanks, ignore frames past each length."""
    ids = logits.argmax(-1)  # (B, T)
    prev = torch.nn.functional.pad(ids, (1, 0), value=-1)[:, :-1]
    keep = (ids != prev) & (ids != BLANK) & frame_mask(lengths, ids.shape[1])
    ids_cpu, keep_cpu = ids.cpu().numpy(), keep.cpu().numpy()
    return [ids_cpu[b][keep_cpu[b]].tolist() for b in range(ids_cpu.shape[0])]


def greedy_texts(logits: Tensor, lengths: Tensor) -> list[str]:
    return [decode_ids(seq) for seq in greedy_decode(logits, lengths)]


def _logadd(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    if a < b:
        a, b = b, a
    return a + math.log1p(math.exp(b - a))


@dataclass
class Hypothesis:
    labels: tuple[int, ...]
    log_prob: float  # log of the total probability of all alignments collapsing to ``labels``
    score: float  # log_prob + prefix_scorer(labels): what the beam is ranked by


def prefix_beam_search(log_probs: np.ndarray | Tensor, beam: int = 8, prune: float = -12.0,
                       prefix_scorer: PrefixScorer | None = None) -> list[Hypothesis]:
    """CTC prefix beam search over one utterance's (T, V) log-probabilities; best hypothesis first.

    ``prune``: a label is tried at a frame only if its log-probability there is above this (``-inf``: try all).
    """
    lp = log_probs.detach().float().cpu().numpy() if isinstance(log_probs, Tensor) else np.asarray(log_probs)
    T, V = lp.shape
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}  # prefix -> [p_b, p_nb]
    scores: dict[tuple[int, ...], float] = {(): prefix_scorer(()) if prefix_scorer else 0.0}
    labels = [v for v in range(V) if v != BLANK]
    for t in range(T):
        row = lp[t]
        p_blank = float(row[BLANK])
        cands = [v for v in labels if row[v] > prune]
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            total = _logadd(pb, pnb)
            e = nxt.setdefault(prefix, [NEG_INF, NEG_INF])
            e[0] = _logadd(e[0], total + p_blank)
            last = prefix[-1] if prefix else None
            for v in cands:
                p = float(row[v])
                ext = prefix + (v,)
                if v == last:
                    e[1] = _logadd(e[1], pnb + p)  # repeat collapses into the same prefix
                    ee = nxt.setdefault(ext, [NEG_INF, NEG_INF])
                    ee[1] = _logadd(ee[1], pb + p)  # a blank separated the repeat: a new label
                else:
                    ee = nxt.setdefault(ext, [NEG_INF, NEG_INF])
                    ee[1] = _logadd(ee[1], total + p)
        for prefix in nxt:
            if prefix not in scores:
                scores[prefix] = prefix_scorer(prefix) if prefix_scorer else 0.0
        ranked = sorted(nxt.items(), key=lambda kv: _logadd(*kv[1]) + scores[kv[0]], reverse=True)
        beams = dict(ranked[:beam])
    hyps = [Hypothesis(p, _logadd(*v), _logadd(*v) + scores[p]) for p, v in beams.items()]
    hyps.sort(key=lambda h: h.score, reverse=True)
    return hyps


def beam_texts(logits: Tensor, lengths: Tensor, beam: int = 8,
               prefix_scorer: PrefixScorer | None = None) -> list[str]:
    """Batched convenience: prefix beam search per utterance, best text each."""
    log_probs = logits.float().log_softmax(-1).cpu()
    out = []
    for b, n in enumerate(lengths.tolist()):
        best = prefix_beam_search(log_probs[b, :n], beam=beam, prefix_scorer=prefix_scorer)[0]
        out.append(decode_ids(best.labels))
    return out


def decode_texts(logits: Tensor, lengths: Tensor, beam: int = 0) -> list[str]:
    """Greedy when ``beam <= 1``, prefix beam search otherwise; words separated by single spaces (a model may emit
    a space at the edges or twice: that is not text)."""
    texts = greedy_texts(logits, lengths) if beam <= 1 else beam_texts(logits, lengths, beam)
    return [" ".join(t.split()) for t in texts]


def collapse(path: Sequence[int]) -> tuple[int, ...]:
    """The CTC collapse function B: merge repeats, then drop blanks (used by tests and the brute-force checker)."""
    out: list[int] = []
    prev = None
    for s in path:
        if s != prev and s != BLANK:
            out.append(s)
        prev = s
    return tuple(out)
