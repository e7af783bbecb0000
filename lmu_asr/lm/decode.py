"""CTC beam search with a word n-gram LM (shallow fusion): lexicon-constrained or free.

* ``lexicon`` (the default): flashlight-text's ``LexiconDecoder`` (C++, with its own KenLM): hypotheses are spelled
  along a trie of the lexicon's words, so every output word is a known word; the score is the acoustic log-prob
  + ``lm_weight`` x the LM's log10-prob (as KenLM gives it) + ``word_score`` per word. Streaming feeds it chunk by chunk
  (``decode_step``), which gives exactly the offline result. The search is wide and pruned by score, as
  wav2letter's recipes run it: up to 512 hypotheses, only those within 25 (natural log) of the best, merged paths
  summed (log-add, as CTC counts them). Measured on the demo's held-out voices (two seeds, weights fixed): beam 32
  with max-merging gave 10.9 / 7.7 % WER at 1.3 ms per utterance; these settings give 6.3 / 3.9 % at 4.5 ms. The
  threshold keeps the wide beam cheap (beam 128 without it: 8.8 ms). Every token is tried at every frame:
  the 10 likeliest decode as well on real posteriors and 1.5x faster, but lose the right word when a confident
  model spreads the rest of its mass evenly (``tests/lm``).
* ``free``: our prefix beam search (``lmu_asr.model.decode.prefix_beam_search``) with the word LM scoring every
  completed word through the same KenLM: any spelling may come out, the LM only weighs words; for corpora
  whose words the lexicon cannot list.

``LMOptions`` come from the command line, else from ``LM_DIR/tuned.json`` (``lmuasr tune-lm`` picks the weights on
a DEV set), else from the defaults below.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmu_asr import UserError
from lmu_asr.text import SYMBOLS

TOKEN = {c: i + 1 for i, c in enumerate(SYMBOLS)}  # the model's ids (0 is blank)
SPACE = TOKEN[" "]


LEXICON_BEAM, FREE_BEAM = 512, 32  # our Python prefix search pays per hypothesis; the C++ one prunes by score


@dataclass
class LMOptions:
    lm_weight: float = 0.5
    word_score: float = 0.0
    beam: int | None = None  # None: LEXICON_BEAM with the lexicon, FREE_BEAM without
    lexicon: bool = True
    beam_threshold: float = 25.0  # lexicon decoder: drop hypotheses this far (natural log) below the best
    token_beam: int = len(SYMBOLS) + 1  # lexicon decoder: tokens tried per hypothesis and frame (all)
    log_add: bool = True  # lexicon decoder: merged hypotheses sum their probabilities (False: keep the max)

    @property
    def width(self) -> int:
        return self.beam or (LEXICON_BEAM if self.lexicon else FREE_BEAM)

    def label(self) -> str:
        return f"beam{self.width}+lm{'' if self.lexicon else '-free'}"


def load_options(lm_dir: Path, **given: Any) -> LMOptions:
    """Explicit values win, then the folder's tuned.json, then the defaults.

    A beam tuned for one mode is not carried to the other (``--no-lexicon`` with a lexicon-tuned beam of 512
    would make our Python prefix search crawl): the other mode gets its own default width.
    """
    opts = LMOptions()
    tuned = lm_dir / "tuned.json"
    if tuned.is_file():
        saved = json.loads(tuned.read_text()).get("options", {})
        other_mode = given.get("lexicon") is not None and given["lexicon"] != saved.get("lexicon", True)
        for k, v in saved.items():
            if hasattr(opts, k) and not (other_mode and k == "beam"):
                setattr(opts, k, v)
    for k, v in given.items():
        if v is not None:
            setattr(opts, k, v)
    return opts


class WordDecoder:
    """Decodes (T, 29) log-probs of one utterance into words with the LM of an ``lmuasr lm build`` folder."""

    def __init__(self, lm_dir: Path, opts: LMOptions) -> None:
        try:
            from flashlight.lib.text.decoder.kenlm import KenLM
            from flashlight.lib.text.dictionary import create_word_dict, load_words
        except ImportError:
            raise UserError("LM decoding needs flashlight-text (pip install flashlight-text)") from None
        lm_dir = Path(lm_dir)
        for name in ("lm.arpa", "lexicon.txt"):
            if not (lm_dir / name).is_file():
                raise UserError(f"{lm_dir} is not an LM folder (no {name}); build one with lmuasr lm build")
        self.opts = opts
        self.lexicon = load_words(str(lm_dir / "lexicon.txt"))
        if len(self.lexicon) <= 1:  # load_words adds <unk> itself
            raise UserError(f"{lm_dir / 'lexicon.txt'} lists no word the model can spell")
        self.words = create_word_dict(self.lexicon)
        with quiet_stderr():  # KenLM draws a loading bar on the C++ stderr
            self.lm = KenLM(str(lm_dir / "lm.arpa"), self.words)
        self._trie: Any = None
        self.decoder = self._lexicon_decoder() if opts.lexicon else None
        self._state_cache: dict[tuple[str, ...], tuple[Any, float]] = {}

    def with_options(self, opts: LMOptions) -> WordDecoder:
        """The same LM, lexicon and trie under other options: what tune-lm's grid needs, without reloading an
        ARPA file per point (a GigaSpeech-sized one takes far longer to load than DEV takes to decode)."""
        other = object.__new__(WordDecoder)
        other.__dict__.update(self.__dict__)
        other.opts, other._state_cache = opts, {}
        other.decoder = other._lexicon_decoder() if opts.lexicon else None
        return other

    def _spelling_trie(self):  # noqa: ANN202 (flashlight type)
        """The lexicon's spellings with each word's unigram score, smeared: built once, shared by every decoder."""
        if self._trie is None:
            from flashlight.lib.text.decoder import SmearingMode, Trie

            trie = Trie(len(SYMBOLS) + 1, SPACE)
            start = self.lm.start(False)
            for word, spellings in self.lexicon.items():
                idx = self.words.get_index(word)
                _, score = self.lm.score(start, idx)
                for spelling in spellings:
                    trie.insert([TOKEN[c] for c in spelling], idx, score)
            trie.smear(SmearingMode.MAX)
            self._trie = trie
        return self._trie

    def _lexicon_decoder(self):  # noqa: ANN202 (flashlight type)
        from flashlight.lib.text.decoder import CriterionType, LexiconDecoder, LexiconDecoderOptions

        trie = self._spelling_trie()
        o = LexiconDecoderOptions(beam_size=self.opts.width, beam_size_token=self.opts.token_beam,
                                  beam_threshold=self.opts.beam_threshold, lm_weight=self.opts.lm_weight,
                                  word_score=self.opts.word_score, unk_score=-math.inf, sil_score=0.0,
                                  log_add=self.opts.log_add, criterion_type=CriterionType.CTC)
        return LexiconDecoder(o, trie, self.lm, SPACE, 0, self.words.get_index("<unk>"), [], False)

    def _text(self, word_ids: list[int]) -> str:
        return " ".join(self.words.get_entry(i) for i in word_ids if i >= 0)

    def decode(self, log_probs: np.ndarray) -> str:
        lp = np.ascontiguousarray(log_probs, dtype=np.float32)
        if len(lp) == 0:
            return ""
        if self.decoder is None:
            return self._free(lp)
        return self._text(self.decoder.decode(lp.ctypes.data, lp.shape[0], lp.shape[1])[0].words)

    # --------------------------------------------------------------- streaming (lexicon decoder)
    def begin(self) -> None:
        if self.decoder is None:
            self._pieces: list[np.ndarray] = []
        else:
            self.decoder.decode_begin()

    def step(self, log_probs: np.ndarray) -> None:
        lp = np.ascontiguousarray(log_probs, dtype=np.float32)
        if self.decoder is None:
            self._pieces.append(lp)
        elif len(lp):
            self.decoder.decode_step(lp.ctypes.data, lp.shape[0], lp.shape[1])

    def end(self) -> str:
        if self.decoder is None:
            return self.decode(np.concatenate(self._pieces) if self._pieces else np.zeros((0, len(SYMBOLS) + 1)))
        self.decoder.decode_end()
        return self._text(self.decoder.get_best_hypothesis().words)

    # --------------------------------------------------------------- lexicon-free, our prefix beam search
    def _lm_score(self, words: tuple[str, ...]) -> float:
        """Natural-log LM score of a word sequence from the sentence start (cached by prefix)."""
        if words in self._state_cache:
            return self._state_cache[words][1]
        if not words:
            state, score = self.lm.start(False), 0.0
        else:
            self._lm_score(words[:-1])
            prev_state, prev = self._state_cache[words[:-1]]
            idx = self.words.get_index(words[-1]) if words[-1] in self.lexicon else self.words.get_index("<unk>")
            state, s = self.lm.score(prev_state, idx)
            score = prev + s
        self._state_cache[words] = (state, score)
        return score

    def _free(self, lp: np.ndarray) -> str:
        from lmu_asr.model.decode import prefix_beam_search
        from lmu_asr.text import decode_ids

        w, ws = self.opts.lm_weight, self.opts.word_score

        def scorer(labels: tuple[int, ...]) -> float:
            words = tuple(decode_ids(labels).split())
            complete = words if labels and labels[-1] == SPACE else words[:-1]
            return w * self._lm_score(complete) + ws * len(words)

        best = prefix_beam_search(lp, beam=self.opts.width, prefix_scorer=scorer)[0]
        words = tuple(decode_ids(best.labels).split())
        return " ".join(words)


def describe(opts: LMOptions) -> dict[str, Any]:
    """The options as reports record them: the width actually searched, not None for "the mode's default"."""
    return {**asdict(opts), "beam": opts.width}


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C++ libraries write there, below Python's sys.stderr)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
