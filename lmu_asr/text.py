"""Vocabulary, GigaSpeech text normalisation and WER/CER scoring.

The vocabulary is fixed (29 symbols) because checkpoints, shards and decoders all index into it: index 0 is the
CTC blank, then space, apostrophe and A-Z.

Two normalisations exist on purpose:

* :func:`normalize_transcript` turns a GigaSpeech ``text_tn`` (or any English transcript) into a training target:
  punctuation tags are dropped, an utterance made only of garbage tags becomes empty (the caller skips it), and
  everything outside the vocabulary is mapped deterministically (accents stripped, digits spelled, ``&`` -> AND,
  hyphens -> space, other characters dropped).
* :func:`scoring_text` applies the GigaSpeech scoring conventions to reference and hypothesis before WER/CER:
  uppercase, hyphen -> space, and the non-scoring words (conversational fillers, ``<UNK>``, punctuation and
  garbage tags) removed. This is what the GigaSpeech leaderboard scores, so our WERs are comparable with it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BLANK = 0
SYMBOLS: tuple[str, ...] = (" ", "'") + tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
VOCAB: tuple[str, ...] = ("<blank>",) + SYMBOLS
VOCAB_SIZE = len(VOCAB)  # 29
_CHAR_TO_ID = {c: i + 1 for i, c in enumerate(SYMBOLS)}

PUNCTUATION_TAGS = ("<COMMA>", "<PERIOD>", "<QUESTIONMARK>", "<EXCLAMATIONPOINT>")
GARBAGE_TAGS = ("<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>")
UNK_TAGS = ("<UNK>",)
CONVERSATIONAL_FILLERS = (
    "UH", "UHH", "UM", "EH", "MM", "HM", "AH", "HUH", "HA", "ER", "OOF", "HEE", "ACH", "EEE", "EW",
)
_NON_SCORING = frozenset(PUNCTUATION_TAGS + GARBAGE_TAGS + UNK_TAGS + CONVERSATIONAL_FILLERS)

_ONES = ("ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE THIRTEEN FOURTEEN FIFTEEN "
         "SIXTEEN SEVENTEEN EIGHTEEN NINETEEN").split()
_TENS = "_ _ TWENTY THIRTY FORTY FIFTY SIXTY SEVENTY EIGHTY NINETY".split()
_SCALES = ((10**12, "TRILLION"), (10**9, "BILLION"), (10**6, "MILLION"), (1000, "THOUSAND"))
_SYMBOL_WORDS = {"&": " AND ", "%": " PERCENT ", "+": " PLUS ", "@": " AT "}
_TAG_RE = re.compile(r"<[A-Z_]+>")
_DIGITS_RE = re.compile(r"\d+")


def number_to_words(n: int) -> str:
    """Spell a non-negative integer in upper-case English ("1820" -> "ONE THOUSAND EIGHT HUNDRED TWENTY")."""
    if n < 0:
        raise ValueError("negative numbers are not spelled")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " HUNDRED" + ("" if rest == 0 else " " + number_to_words(rest))
    for value, name in _SCALES:
        if n >= value:
            major, rest = divmod(n, value)
            if major >= 1000 and value == 10**12:
                return " ".join(_ONES[int(d)] for d in str(n))  # absurdly long: spell digit by digit
            return number_to_words(major) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


def _spell_digits(match: re.Match[str]) -> str:
    digits = match.group(0)
    if len(digits) > 15 or (len(digits) > 1 and digits.startswith("0")):
        return " " + " ".join(_ONES[int(d)] for d in digits) + " "  # codes, phone numbers: digit by digit
    return " " + number_to_words(int(digits)) + " "


def normalize_transcript(text: str) -> str:
    """Map a raw transcript to the model's alphabet; returns "" when nothing speakable is left.

    Deterministic and idempotent: ``normalize_transcript(normalize_transcript(t)) == normalize_transcript(t)``.
    """
    text = text.upper()
    # Tags are removed before anything else so "<COMMA>" never leaks letters into the target.
    text = _TAG_RE.sub(" ", text)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    for sym, word in _SYMBOL_WORDS.items():
        text = text.replace(sym, word)
    text = _DIGITS_RE.sub(_spell_digits, text)
    out = []
    for ch in text:
        if ch in _CHAR_TO_ID:
            out.append(ch)
        elif ch.isspace() or ch in "-_/":
            out.append(" ")
        # any other character (punctuation, symbols) is dropped: "U.S." -> "US"
    words = "".join(out).split()
    # A word made only of apostrophes carries no sound.
    return " ".join(w for w in words if w.strip("'"))


def encode(text: str) -> list[int]:
    """Token ids of an already normalised transcript; raises on characters outside the vocabulary."""
    try:
        return [_CHAR_TO_ID[c] for c in text]
    except KeyError as err:
        raise ValueError(f"character {err.args[0]!r} is not in the vocabulary; normalise the text first") from None


def decode_ids(ids: Iterable[int]) -> str:
    """Text of a label sequence (blanks ignored; repeats are *not* collapsed here: see decode.py)."""
    return "".join(VOCAB[i] for i in ids if i != BLANK)


def scoring_text(text: str) -> str:
    """Apply the GigaSpeech scoring conventions: uppercase, hyphen -> space, drop non-scoring words."""
    words = text.upper().replace("-", " ").split()
    return " ".join(w for w in words if w not in _NON_SCORING)


def edit_distance(ref: Sequence[object], hyp: Sequence[object]) -> int:
    """Levenshtein distance (unit costs) between two token sequences, O(len(ref)*len(hyp)) time, O(len(hyp)) memory."""
    if not ref:
        return len(hyp)
    if not hyp:
        return len(ref)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def align_words(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[str, str]]:
    """A minimum-edit alignment of two word sequences as (reference word, hypothesis word) pairs: equal for a
    match, different for a substitution, "" on one side for a deletion or an insertion. Its error count is
    :func:`edit_distance`'s; among equal-cost alignments it prefers substitutions, then deletions (what a
    reader expects to see: "TWO -> FOUR" rather than a deletion and an insertion)."""
    n, m = len(ref), len(hyp)
    cost = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]), cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    pairs: list[tuple[str, str]] = []
    i, j = n, m
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            pairs.append((ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            pairs.append((ref[i - 1], ""))
            i -= 1
        else:
            pairs.append(("", hyp[j - 1]))
            j -= 1
    return pairs[::-1]


TOP_CONFUSIONS = 15  # how many of them reports keep


def word_confusions(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str | int]]:
    """Every word error of (reference, hypothesis) texts, GigaSpeech-scored and aligned by :func:`align_words`,
    as [{"reference", "hypothesis", "count"}] ("" for a deletion's hypothesis or an insertion's reference), most
    frequent first; the counts add up to the WER's word errors."""
    counts: Counter = Counter()
    for ref, hyp in pairs:
        counts.update(p for p in align_words(scoring_text(ref).split(), scoring_text(hyp).split()) if p[0] != p[1])
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"reference": r, "hypothesis": h, "count": n} for (r, h), n in ranked]


def rates_by_group(hypotheses: Iterable[tuple[str, str, str]], group_of: dict[str, str]
                   ) -> dict[str, dict[str, float | int]]:
    """WER, word errors, reference words and utterances per group (e.g. speaker) of (key, reference, hypothesis)
    triples; keys without a group go to "?". The groups' errors and words add up to the corpus totals."""
    groups: dict[str, ErrorRates] = {}
    for key, ref, hyp in hypotheses:
        groups.setdefault(group_of.get(key, "?"), ErrorRates()).add(ref, hyp)
    return {g: {"wer": r.wer, "word_errors": r.word_errors, "ref_words": r.ref_words, "utterances": r.utterances}
            for g, r in sorted(groups.items())}


def confusion_line(confusions: list[dict[str, str | int]], n: int = 3) -> str:
    """``TWO -> FOUR (38), ...``: the first ``n`` confusions for a terminal line."""
    return ", ".join(f"{c['reference'] or '(none)'} -> {c['hypothesis'] or '(none)'} ({c['count']})"
                     for c in confusions[:n])


@dataclass
class ErrorRates:
    """Corpus-level error counts: WER = word_errors / ref_words, CER = char_errors / ref_chars."""

    word_errors: int = 0
    ref_words: int = 0
    char_errors: int = 0
    ref_chars: int = 0
    utterances: int = 0

    @property
    def wer(self) -> float:
        return self.word_errors / max(self.ref_words, 1)

    @property
    def cer(self) -> float:
        return self.char_errors / max(self.ref_chars, 1)

    def add(self, ref: str, hyp: str, gigaspeech_scoring: bool = True) -> None:
        if gigaspeech_scoring:
            ref, hyp = scoring_text(ref), scoring_text(hyp)
        ref_w, hyp_w = ref.split(), hyp.split()
        self.word_errors += edit_distance(ref_w, hyp_w)
        self.ref_words += len(ref_w)
        # CER over the space-normalised strings, spaces included (the jiwer convention).
        ref_c, hyp_c = " ".join(ref_w), " ".join(hyp_w)
        self.char_errors += edit_distance(ref_c, hyp_c)
        self.ref_chars += len(ref_c)
        self.utterances += 1

    def merge(self, other: ErrorRates) -> None:
        self.word_errors += other.word_errors
        self.ref_words += other.ref_words
        self.char_errors += other.char_errors
        self.ref_chars += other.ref_chars
        self.utterances += other.utterances

    def as_dict(self) -> dict[str, float | int]:
        return {"wer": self.wer, "cer": self.cer, "word_errors": self.word_errors, "ref_words": self.ref_words,
                "char_errors": self.char_errors, "ref_chars": self.ref_chars, "utterances": self.utterances}


def error_rates(refs: Iterable[str], hyps: Iterable[str], gigaspeech_scoring: bool = True) -> ErrorRates:
    """Corpus WER/CER of paired references and hypotheses."""
    rates = ErrorRates()
    for ref, hyp in zip(refs, hyps, strict=True):
        rates.add(ref, hyp, gigaspeech_scoring)
    return rates
