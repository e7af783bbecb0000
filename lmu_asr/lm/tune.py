"""``lmuasr tune-lm``: choose the LM weight and word score on a DEV set, once, for ``eval``/``transcribe``/``demo``.

The model runs once over the DEV shards (``evaluate(collect=...)`` keeps every utterance's log-probs); each point
of the grid is then a pass of the C++ decoder over them, a fraction of a second for a few hundred utterances. The
best point (lowest WER, then the smaller LM weight) is written to ``LM_DIR/tuned.json``, where the decoders find
it when no weights are given on the command line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lmu_asr.fileio import atomic_write
from lmu_asr.lm.decode import LMOptions, WordDecoder
from lmu_asr.text import ErrorRates

WEIGHTS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
WORD_SCORES = (-2.0, -1.0, 0.0, 1.0)


def score(decoder: WordDecoder, utterances: list[tuple[str, str, Any]]) -> dict[str, Any]:
    rates = ErrorRates()
    for _, ref, log_probs in utterances:
        rates.add(ref, decoder.decode(log_probs))
    return rates.as_dict()


def tune(lm_dir: Path, utterances: list[tuple[str, str, Any]], beam: int = 32, lexicon: bool = True,
         weights: tuple[float, ...] = WEIGHTS, word_scores: tuple[float, ...] = WORD_SCORES,
         checkpoint: str = "") -> dict[str, Any]:
    """Grid search on (key, reference, log-probs) of a DEV set; writes and returns ``tuned.json``'s content."""
    t0 = time.time()
    grid = []
    for w in weights:
        for ws in word_scores:
            opts = LMOptions(lm_weight=w, word_score=ws, beam=beam, lexicon=lexicon)
            res = score(WordDecoder(lm_dir, opts), utterances)
            grid.append({"lm_weight": w, "word_score": ws, "wer": res["wer"], "cer": res["cer"]})
    best = min(grid, key=lambda g: (g["wer"], g["lm_weight"], abs(g["word_score"])))
    out = {"options": {"lm_weight": best["lm_weight"], "word_score": best["word_score"], "beam": beam,
                       "lexicon": lexicon},
           "dev_wer": best["wer"], "dev_utterances": len(utterances), "checkpoint": checkpoint, "grid": grid,
           "seconds": round(time.time() - t0, 2)}
    atomic_write(Path(lm_dir) / "tuned.json", json.dumps(out, indent=1))
    return out
