"""Vocabulary, normalisation and scoring; WER/CER checked against jiwer."""

from __future__ import annotations

import random

import jiwer
import pytest

from lmu_asr.text import (
    VOCAB,
    VOCAB_SIZE,
    align_words,
    confusion_line,
    decode_ids,
    encode,
    error_rates,
    normalize_transcript,
    number_to_words,
    rates_by_group,
    scoring_text,
    word_confusions,
)


def test_vocabulary_layout() -> None:
    assert VOCAB_SIZE == 29 and VOCAB[0] == "<blank>" and VOCAB[1] == " " and VOCAB[2] == "'"
    assert "".join(VOCAB[3:]) == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    text = "IT'S A TEST"
    assert decode_ids(encode(text)) == text
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("hello")


@pytest.mark.parametrize("raw,expected", [
    ("AS THEY'RE LEAVING <COMMA> CAN KASH PULL ZAHRA ASIDE REALLY QUICKLY <QUESTIONMARK>",
     "AS THEY'RE LEAVING CAN KASH PULL ZAHRA ASIDE REALLY QUICKLY"),
    ("<SIL>", ""), ("<MUSIC> <NOISE>", ""), ("<OTHER> <COMMA>", ""),
    ("WELL <NOISE> I THINK <PERIOD>", "WELL I THINK"),
    ("state-of-the-art café", "STATE OF THE ART CAFE"),
    ("In 1820, 3 men & 2% U.S.", "IN ONE THOUSAND EIGHT HUNDRED TWENTY THREE MEN AND TWO PERCENT US"),
    ("call 007 now", "CALL ZERO ZERO SEVEN NOW"),
    ("  it\u2019s   ok!! ''  ", "IT'S OK"),
])
def test_normalisation(raw: str, expected: str) -> None:
    out = normalize_transcript(raw)
    assert out == expected
    assert normalize_transcript(out) == out  # idempotent
    encode(out)  # only vocabulary characters remain


def test_numbers() -> None:
    assert number_to_words(0) == "ZERO"
    assert number_to_words(15) == "FIFTEEN"
    assert number_to_words(40) == "FORTY"
    assert number_to_words(101) == "ONE HUNDRED ONE"
    assert number_to_words(2_000_017) == "TWO MILLION SEVENTEEN"


def test_random_text_always_normalises_into_the_vocabulary() -> None:
    rng = random.Random(0)
    alphabet = "abcXYZ019 '\"-,.;:!?<>&%$#@éüñ\t\n"
    for _ in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        out = normalize_transcript(s)
        encode(out)
        assert out == out.strip() and "  " not in out


def test_scoring_conventions() -> None:
    assert scoring_text("uh I think <COMMA> e-commerce UM is <NOISE> fine") == "I THINK E COMMERCE IS FINE"
    rates = error_rates(["I THINK SO"], ["UH I THINK <COMMA> SO"])
    assert rates.wer == 0.0  # fillers and tags do not count as insertions
    assert error_rates(["I THINK SO"], ["UH I THINK SO"], gigaspeech_scoring=False).wer == pytest.approx(1 / 3)


def test_wer_cer_match_jiwer() -> None:
    rng = random.Random(1)
    words = "THE CAT SAT ON A MAT DOG RAN FAST SLOW IT'S".split()
    refs, hyps = [], []
    for _ in range(200):
        ref = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        hyp_words = [w for w in ref.split() if rng.random() > 0.2]
        for _ in range(rng.randint(0, 3)):
            hyp_words.insert(rng.randint(0, len(hyp_words)), rng.choice(words))
        hyps.append(" ".join(hyp_words))
        refs.append(ref)
    rates = error_rates(refs, hyps, gigaspeech_scoring=False)
    assert rates.wer == pytest.approx(jiwer.wer(refs, hyps), rel=1e-12)
    assert rates.cer == pytest.approx(jiwer.cer(refs, hyps), rel=1e-12)


def test_word_alignment_counts_what_jiwer_counts_and_rebuilds_both_sides() -> None:
    """The demo's confusion table comes from this alignment: its errors must be the WER's errors."""
    rng = random.Random(2)
    words = "ONE TWO THREE FOUR FIVE SIX".split()
    for _ in range(300):
        ref = [rng.choice(words) for _ in range(rng.randint(0, 8))]
        hyp = [w if rng.random() > 0.3 else rng.choice(words) for w in ref if rng.random() > 0.15]
        for _ in range(rng.randint(0, 2)):
            hyp.insert(rng.randint(0, len(hyp)), rng.choice(words))
        pairs = align_words(ref, hyp)
        assert [r for r, _ in pairs if r] == ref and [h for _, h in pairs if h] == hyp
        assert all(r or h for r, h in pairs)
        if ref:
            out = jiwer.process_words(" ".join(ref), " ".join(hyp) or "")
            assert sum(r != h for r, h in pairs) == out.substitutions + out.deletions + out.insertions
    assert align_words(["TWO"], ["FOUR"]) == [("TWO", "FOUR")]  # one substitution, not a deletion + insertion
    assert align_words([], ["UH"]) == [("", "UH")] and align_words(["A"], []) == [("A", "")]


def test_word_confusions_rank_and_add_up_to_the_word_errors() -> None:
    pairs = [("TWO THREE", "FOUR THREE"), ("two", "FOUR"), ("ONE", ""), ("UH SIX", "SIX SIX")]
    confusions = word_confusions(pairs)
    assert confusions == [{"reference": "TWO", "hypothesis": "FOUR", "count": 2},
                          {"reference": "", "hypothesis": "SIX", "count": 1},  # UH does not score (GigaSpeech)
                          {"reference": "ONE", "hypothesis": "", "count": 1}]
    assert sum(c["count"] for c in confusions) == error_rates(*zip(*pairs, strict=True)).word_errors
    assert confusion_line(confusions, 2) == "TWO -> FOUR (2), (none) -> SIX (1)"


def test_rates_by_group_add_up_to_the_corpus() -> None:
    hyps = [("a", "ONE TWO", "ONE TOO"), ("b", "THREE", "THREE"), ("c", "FOUR FIVE", ""), ("d", "SIX", "SIX SIX")]
    groups = rates_by_group(hyps, {"a": "x", "b": "x", "c": "y"})
    assert groups == {"?": {"wer": 1.0, "word_errors": 1, "ref_words": 1, "utterances": 1},
                      "x": {"wer": 1 / 3, "word_errors": 1, "ref_words": 3, "utterances": 2},
                      "y": {"wer": 1.0, "word_errors": 2, "ref_words": 2, "utterances": 1}}
    total = error_rates([h[1] for h in hyps], [h[2] for h in hyps])
    assert sum(g["word_errors"] for g in groups.values()) == total.word_errors
