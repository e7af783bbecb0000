"""``lmuasr tune-lm``: choose the LM weight and word score on a DEV set, once, for ``eval``/``transcribe``/``demo``.

The model runs once over the DEV shards (``evaluate(collect=...)`` keeps every utterance's log-probs); each point
of the grid is then a pass of the C++ decoder over them, about a second for a hundred utterances. The best point
is written to ``LM_DIR/tuned.json``, where the decoders find it when no weights are given on the command line.

Best means the lowest DEV WER; among ties, the LM weight nearest ln 10 (KenLM's scores are log10, so that weight
adds the LM's natural-log probability at unit weight: the plain Bayes combination), then the word score nearest
0. Ties are common when DEV is easy (FSDD's DEV, drawn from the training speakers, is 0 % WER at every point);
the old tie-break (the smallest weight) then chose the weakest LM, and on FSDD's unseen speaker the plain
combination scored 17.0 / 12.2 / 1.2 % where the weakest gave 17.4 / 12.2 / 1.6 % (two seeds on theo, one on
FSDD's own split).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from lmu_asr.fileio import atomic_write
from lmu_asr.lm.decode import LMOptions, WordDecoder
from lmu_asr.text import ErrorRates

WEIGHTS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
WORD_SCORES = (-2.0, -1.0, 0.0, 1.0)
BAYES_WEIGHT = math.log(10)  # the tie-break's preferred LM weight (see above)


def score(decoder: WordDecoder, utterances: list[tuple[str, str, Any]]) -> dict[str, Any]:
    rates = ErrorRates()
    for _, ref, log_probs in utterances:
        rates.add(ref, decoder.decode(log_probs))
    return rates.as_dict()


_SHARED: dict[str, Any] = {}  # DEV log-probs and the loaded LM, handed to forked workers by memory


def _grid_point(args: tuple[float, float, int | None, bool]) -> dict[str, Any]:
    w, ws, beam, lexicon = args
    decoder = _SHARED["decoder"].with_options(LMOptions(lm_weight=w, word_score=ws, beam=beam, lexicon=lexicon))
    res = score(decoder, _SHARED["utterances"])
    return {"lm_weight": w, "word_score": ws, "wer": res["wer"], "cer": res["cer"]}


def tune(lm_dir: Path, utterances: list[tuple[str, str, Any]], beam: int | None = None, lexicon: bool = True,
         weights: tuple[float, ...] = WEIGHTS, word_scores: tuple[float, ...] = WORD_SCORES,
         checkpoint: str = "", jobs: int | None = None) -> dict[str, Any]:
    """Grid search on (key, reference, log-probs) of a DEV set; writes and returns ``tuned.json``'s content.

    Grid points run in ``jobs`` forked processes (default: one per core): the C++ decoder holds the GIL, and a
    large DEV set (GigaSpeech's is 12 h) times 32 points is minutes per core. A weak model is slow too: early
    checkpoints' flat posteriors keep many hypotheses within the beam threshold (27 ms per utterance after the
    quick demo's 8 epochs against 6 ms after 25)."""
    t0 = time.time()
    points = [(w, ws, beam, lexicon) for w in weights for ws in word_scores]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = min(len(points), jobs or cores)
    # the LM is loaded (and the trie built) once, here, before the workers fork
    _SHARED.update(utterances=utterances, decoder=WordDecoder(Path(lm_dir), LMOptions(beam=beam, lexicon=lexicon)))
    try:
        if jobs > 1 and "fork" in mp.get_all_start_methods():
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
                grid = list(pool.map(_grid_point, points))
        else:
            grid = [_grid_point(p) for p in points]
    finally:
        _SHARED.clear()
    best = min(grid, key=lambda g: (g["wer"], abs(g["lm_weight"] - BAYES_WEIGHT), abs(g["word_score"])))
    out = {"options": {"lm_weight": best["lm_weight"], "word_score": best["word_score"],
                       "beam": LMOptions(beam=beam, lexicon=lexicon).width, "lexicon": lexicon},
           "dev_wer": best["wer"], "dev_utterances": len(utterances), "checkpoint": checkpoint, "grid": grid,
           "seconds": round(time.time() - t0, 2)}
    atomic_write(Path(lm_dir) / "tuned.json", json.dumps(out, indent=1))
    return out
