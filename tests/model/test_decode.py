"""Decoding against brute force: enumerate every alignment, collapse, sum probabilities per label sequence."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from lmu_asr.model.decode import collapse, greedy_decode, prefix_beam_search


def brute_force(log_probs: np.ndarray) -> dict[tuple[int, ...], float]:
    """Total probability of every label sequence: sum over all V^T alignments that collapse to it."""
    T, V = log_probs.shape
    totals: dict[tuple[int, ...], float] = defaultdict(float)
    probs = np.exp(log_probs)
    for path in itertools.product(range(V), repeat=T):
        totals[collapse(path)] += float(np.prod([probs[t, s] for t, s in enumerate(path)]))
    return totals


def random_posteriors(rng: np.random.Generator, T: int, V: int, sharpness: float) -> np.ndarray:
    logits = rng.normal(size=(T, V)) * sharpness
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@pytest.mark.parametrize("seed", range(12))
def test_exhaustive_beam_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    T, V = int(rng.integers(3, 6)), int(rng.integers(3, 5))
    lp = random_posteriors(rng, T, V, sharpness=float(rng.uniform(0.5, 3.0)))
    totals = brute_force(lp)
    best_labels, best_prob = max(totals.items(), key=lambda kv: kv[1])
    hyps = prefix_beam_search(lp, beam=10_000, prune=-math.inf)
    assert hyps[0].labels == best_labels
    assert math.exp(hyps[0].log_prob) == pytest.approx(best_prob, rel=1e-9)
    # every hypothesis carries its exact total probability
    for h in hyps:
        assert math.exp(h.log_prob) == pytest.approx(totals[h.labels], rel=1e-9)
    # the beam's answer is at least as probable as the best path's label sequence
    greedy = tuple(greedy_decode(torch.from_numpy(lp)[None], torch.tensor([T]))[0])
    assert best_prob >= totals[greedy] - 1e-15


def test_merging_prefixes_beats_best_path() -> None:
    """A case where the most probable label sequence is not the best path's (needs alignment merging)."""
    p = np.array([[0.4, 0.6, 0.0], [0.4, 0.6, 0.0]]) + 1e-12  # blank, A, B
    lp = np.log(p / p.sum(-1, keepdims=True))
    greedy = tuple(greedy_decode(torch.from_numpy(lp)[None], torch.tensor([2]))[0])
    assert greedy == (1,)  # best path "AA" -> "A" (0.36); but "A" also via "A_", "_A" -> 0.84
    best = prefix_beam_search(lp, beam=4, prune=-math.inf)[0]
    assert best.labels == (1,) and math.exp(best.log_prob) == pytest.approx(0.36 + 0.24 + 0.24)
    p2 = np.array([[0.5, 0.3, 0.2], [0.5, 0.2, 0.3]])  # best path: blank blank -> "" (0.25)
    totals = brute_force(np.log(p2))
    best2 = prefix_beam_search(np.log(p2), beam=8, prune=-math.inf)[0]
    assert totals[()] == pytest.approx(0.25)
    assert math.exp(best2.log_prob) == pytest.approx(max(totals.values())) and best2.labels != ()


def test_prefix_scorer_hook_changes_the_ranking() -> None:
    rng = np.random.default_rng(3)
    lp = random_posteriors(rng, 6, 4, 2.0)
    plain = prefix_beam_search(lp, beam=16, prune=-math.inf)[0]
    banned = plain.labels[0]
    scored = prefix_beam_search(lp, beam=16, prune=-math.inf,
                                prefix_scorer=lambda pre: -100.0 * pre.count(banned))[0]
    assert banned not in scored.labels
    assert scored.score == pytest.approx(scored.log_prob)  # the bonus ranks, it never enters the acoustic sum


def test_greedy_collapses_and_respects_lengths() -> None:
    ids = torch.tensor([[1, 1, 0, 1, 2, 2, 0, 3], [4, 0, 4, 4, 5, 6, 7, 8]])
    logits = torch.nn.functional.one_hot(ids, 9).float()
    assert greedy_decode(logits, torch.tensor([8, 4])) == [[1, 1, 2, 3], [4, 4]]
