"""Word LMs: the ARPA against a plain reference implementation of modified Kneser-Ney, KenLM (flashlight) reading
it, lexicon decoding fixing misspellings, tuning, eval/transcribe with --lm (streaming = offline)."""

from __future__ import annotations

import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from lmu_asr.lm.build import build_lm, estimate, write_arpa
from lmu_asr.text import encode
from tests.helpers import run_cli

pytest.importorskip("flashlight.lib.text", reason="LM decoding needs flashlight-text")


def parse_arpa(text: str) -> tuple[dict, dict]:
    probs, backoffs, order = {}, {}, 0
    for line in text.splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1])
            continue
        if not order or not line.strip() or line.startswith("\\"):
            continue
        parts = line.split("\t")
        gram = tuple(parts[1].split())
        probs[gram] = float(parts[0])
        backoffs[gram] = float(parts[2]) if len(parts) > 2 else 0.0
    return probs, backoffs


def arpa_log10(probs: dict, backoffs: dict, history: tuple, word: str) -> float:
    """ARPA backoff semantics, independent of the builder."""
    if (*history, word) in probs:
        return probs[(*history, word)]
    if not history:
        return probs[("<unk>",)]
    return backoffs.get(history, 0.0) + arpa_log10(probs, backoffs, history[1:], word)


def reference_kn(sentences: list[list[str]]) -> callable:
    """Interpolated modified Kneser-Ney for trigrams, written plainly from the definitions (dicts, no numpy)."""
    padded = [["<s>", *s, "</s>"] for s in sentences]
    c3 = Counter(tuple(p[i:i + 3]) for p in padded for i in range(len(p) - 2))
    raw2 = Counter(tuple(p[i:i + 2]) for p in padded for i in range(len(p) - 1))
    a2 = {g: (n if g[0] == "<s>" else len({t[0] for t in c3 if t[1:] == g})) for g, n in raw2.items()}
    a1 = {(w,): len({b[0] for b in raw2 if b[1] == w}) for p in padded for w in p if w != "<s>"}
    vocab = {w for p in padded for w in p if w != "<s>"} | {"<unk>"}

    def discounts(counts: dict) -> list[float]:
        n = [sum(1 for v in counts.values() if v == k) for k in (1, 2, 3, 4)]
        if min(n) == 0:
            return [0.5, 1.0, 1.5]
        y = n[0] / (n[0] + 2 * n[1])
        return [min(max(1 - 2 * y * n[1] / n[0], 0.01), 0.99), min(max(2 - 3 * y * n[2] / n[1], 0.01), 1.99),
                min(max(3 - 4 * y * n[3] / n[2], 0.01), 2.99)]

    tables = {1: a1, 2: a2, 3: dict(c3)}
    disc = {k: discounts(t) for k, t in tables.items()}
    by_ctx: dict = {k: defaultdict(dict) for k in (1, 2, 3)}
    for k, t in tables.items():
        for g, n in t.items():
            by_ctx[k][g[:-1]][g[-1]] = n

    def gamma(k: int, ctx: tuple) -> tuple[float, float]:
        row = by_ctx[k][ctx]
        total = sum(row.values())
        d = disc[k]
        return total, sum(d[min(n, 3) - 1] for n in row.values()) / total

    def prob(history: tuple, word: str) -> float:
        k = len(history) + 1
        if k == 1:
            total, g = gamma(1, ())
            n = by_ctx[1][()].get(word, 0)
            return (max(n - disc[1][min(n, 3) - 1], 0) / total if n else 0.0) + g / (len(vocab))
        lower = prob(history[1:], word)
        if history not in by_ctx[k]:
            return lower
        total, g = gamma(k, history)
        n = by_ctx[k][history].get(word, 0)
        return (n - disc[k][min(n, 3) - 1]) / total + g * lower if n else g * lower

    return prob, vocab


def test_arpa_is_modified_kneser_ney_and_normalised() -> None:
    rng = np.random.default_rng(3)
    letters = list("ABCDEFGH")
    sentences = [list(rng.choice(letters, rng.integers(1, 8))) for _ in range(400)]
    words, tables, bits = estimate(iter(sentences), 3)
    buf = io.BytesIO()
    write_arpa(words, tables, bits, buf)
    probs, backoffs = parse_arpa(buf.getvalue().decode())
    ref, vocab = reference_kn(sentences)
    histories = [()] + [(w,) for w in words if w != "</s>"] + [(a, b) for a in words for b in words
                                                                  if b not in ("<s>", "</s>") and a != "</s>"]
    for h in histories:
        ours = [10 ** arpa_log10(probs, backoffs, h, w) for w in sorted(vocab)]
        theirs = [ref(h, w) for w in sorted(vocab)]
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-9)
        assert abs(sum(ours) - 1) < 1e-5


def test_kenlm_reads_our_arpa(tmp_path: Path) -> None:
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import create_word_dict, load_words

    sentences = ["TURN ON THE LIGHT", "TURN OFF THE LIGHT", "OPEN THE DOOR", "TURN ON THE RADIO"]
    build_lm(sentences, tmp_path / "lm", 3)
    probs, backoffs = parse_arpa((tmp_path / "lm" / "lm.arpa").read_text())
    lexicon = load_words(str(tmp_path / "lm" / "lexicon.txt"))
    assert set(lexicon) - {"<unk>"} == {"TURN", "ON", "OFF", "THE", "LIGHT", "OPEN", "DOOR", "RADIO"}
    wd = create_word_dict(lexicon)
    lm = KenLM(str(tmp_path / "lm" / "lm.arpa"), wd)
    state, history = lm.start(False), ("<s>",)
    for word in ["TURN", "OFF", "THE", "RADIO"]:
        state, score = lm.score(state, wd.get_index(word))
        assert score == pytest.approx(arpa_log10(probs, backoffs, history[-2:], word), abs=1e-5)
        history += (word,)


def emissions_for(text: str, frames_per_char: int = 3, confidence: float = 0.9) -> np.ndarray:
    """Log-probs that spell ``text`` (a letter, then blanks), with the rest of the mass spread thin."""
    ids = encode(text)
    T = len(ids) * frames_per_char
    p = np.full((T, 29), (1 - confidence) / 28, np.float32)
    p[:, 0] = confidence
    for i, c in enumerate(ids):
        p[i * frames_per_char] = (1 - confidence) / 28
        p[i * frames_per_char, c] = confidence
    return np.log(p)


def test_lexicon_decoding_spells_known_words(tmp_path: Path) -> None:
    from lmu_asr.lm.decode import LMOptions, WordDecoder

    build_lm(["TURN OFF THE BATHROOM TELEVISION"] * 3 + ["TURN ON THE KITCHEN LIGHT"] * 3, tmp_path / "lm", 3)
    lp = emissions_for("TURN OF THE BATHROO TLIVISON")  # what greedy decoding printed in the demo
    assert WordDecoder(tmp_path / "lm", LMOptions(lm_weight=1.0)).decode(lp) == "TURN OFF THE BATHROOM TELEVISION"
    # why every token is tried: the letters TELEVISION needs tie with 20 others here, so a token beam of 10 is a
    # lottery (and loses)
    assert WordDecoder(tmp_path / "lm", LMOptions(lm_weight=1.0, token_beam=10)).decode(lp) != \
        "TURN OFF THE BATHROOM TELEVISION"
    free = WordDecoder(tmp_path / "lm", LMOptions(lm_weight=1.0, lexicon=False, beam=8)).decode(lp)
    assert free.split()[0] == "TURN"  # the lexicon-free decoder may spell anything; the LM only weighs words
    dec = WordDecoder(tmp_path / "lm", LMOptions(lm_weight=1.0))
    dec.begin()
    for start in range(0, len(lp), 7):  # chunk by chunk gives the whole-utterance result
        dec.step(lp[start:start + 7])
    assert dec.end() == "TURN OFF THE BATHROOM TELEVISION"


def test_lm_build_tune_eval_transcribe(window_run: Path, synth_shards: Path, synth_dev: Path, tmp_path: Path) -> None:
    lm = tmp_path / "lm"
    code, output = run_cli("lm", "build", "--shards", str(synth_shards), "--out", str(lm))
    assert code == 0 and "3-gram LM of" in output, output
    info = json.loads((lm / "lm.json").read_text())
    assert info["vocabulary"] > 20 and info["unspellable_words"] == 0
    ck = window_run / "checkpoints" / "last.pt"
    code, output = run_cli("tune-lm", "--checkpoint", str(ck), "--shards", str(synth_dev), "--lm", str(lm),
                           "--weights", "0.5,2", "--word-scores", "-1,0")
    assert code == 0, output
    tuned = json.loads((lm / "tuned.json").read_text())
    assert len(tuned["grid"]) == 4 and tuned["dev_wer"] == min(g["wer"] for g in tuned["grid"])
    code, output = run_cli("eval", "--checkpoint", str(ck), "--shards", str(synth_dev), "--lm", str(lm), "--report",
                           str(tmp_path / "e.json"))
    assert code == 0 and "beam512+lm" in output, output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["wer"] == pytest.approx(tuned["dev_wer"]) and report["lm"]["lm_weight"] == tuned["options"][
        "lm_weight"]
    assert report["lm"]["beam"] == tuned["options"]["beam"] == 512  # the width searched, recorded as a number
    import soundfile as sf

    from lmu_asr.prep.synth import SynthSpec, synthetic_utterances

    files = []
    for u in synthetic_utterances(SynthSpec(xs=3, dev=0, test=0, seed=8)):
        files.append(tmp_path / f"{u.utt_id}.wav")
        sf.write(files[-1], u.audio, 16000)
    args = ["transcribe", "--checkpoint", str(ck), "--lm", str(lm), *map(str, files)]
    code, offline = run_cli(*args)
    code2, streaming = run_cli(*args[:3], "--streaming", "--chunk-frames", "16", *args[3:])
    assert code == code2 == 0 and offline == streaming  # the LM decoder takes chunks as they come
    vocab = {w for line in (lm / "lexicon.txt").read_text().splitlines() for w in line.split("\t")[:1]}
    assert all(w in vocab for line in offline.splitlines() for w in line.split("\t")[1].split())


def test_options_precedence(tmp_path: Path) -> None:
    from lmu_asr.lm.decode import FREE_BEAM, LEXICON_BEAM, LMOptions, load_options

    assert LMOptions().width == LEXICON_BEAM and LMOptions(lexicon=False).width == FREE_BEAM
    (tmp_path / "tuned.json").write_text(json.dumps({"options": {"lm_weight": 2.5, "word_score": -1.0,
                                                                 "beam": 300, "lexicon": True}}))
    tuned = load_options(tmp_path)
    assert (tuned.lm_weight, tuned.word_score, tuned.width) == (2.5, -1.0, 300)
    assert load_options(tmp_path, lm_weight=1.0, beam=64).lm_weight == 1.0
    assert load_options(tmp_path, beam=64).width == 64
    free = load_options(tmp_path, lexicon=False)  # a lexicon-tuned width would make the Python search crawl
    assert free.width == FREE_BEAM and free.lm_weight == 2.5


def test_tune_in_parallel_gives_the_serial_grid(tmp_path: Path) -> None:
    from lmu_asr.lm.tune import tune

    build_lm(["TURN OFF THE BATHROOM TELEVISION", "TURN ON THE KITCHEN LIGHT", "TURN OFF THE LIGHT"], tmp_path, 3)
    said = ["TUR OF TE BATROO TLIVSON", "TRN N TE KICHN LIT", "TRN OF TH LIT"]  # badly enough that weights matter
    utts = [(str(i), ref, emissions_for(text, confidence=0.3)) for i, (ref, text) in enumerate(
        zip(["TURN OFF THE BATHROOM TELEVISION", "TURN ON THE KITCHEN LIGHT", "TURN OFF THE LIGHT"], said,
            strict=True))]
    serial = tune(tmp_path, utts, jobs=1)
    parallel = tune(tmp_path, utts, jobs=3)
    assert parallel["grid"] == serial["grid"] and len(serial["grid"]) == 32
    assert len({g["wer"] for g in serial["grid"]}) > 1  # the points differ, so a mixed-up order would show


def test_tune_breaks_ties_at_the_plain_bayes_weight(tmp_path: Path, monkeypatch) -> None:
    from lmu_asr.lm import tune as tune_mod

    build_lm(["ONE", "TWO", "THREE"], tmp_path, 2)
    monkeypatch.setattr(tune_mod, "score", lambda decoder, utts: {"wer": 0.0, "cer": 0.0})  # an easy DEV: all tie
    assert tune_mod.tune(tmp_path, [])["options"] | {"beam": 0} == {"lm_weight": 2.5, "word_score": 0.0,
                                                                    "beam": 0, "lexicon": True}
    rates = {(1.0, -1.0): 0.1}  # a lower WER anywhere wins over the tie-break
    monkeypatch.setattr(tune_mod, "score", lambda d, u: {"wer": rates.get((d.opts.lm_weight, d.opts.word_score),
                                                                         0.2), "cer": 0.0})
    best = tune_mod.tune(tmp_path, [])["options"]
    assert (best["lm_weight"], best["word_score"]) == (1.0, -1.0)


@pytest.mark.parametrize("args,message", [
    (["lm", "build", "--out", "X"], "give --shards DIR or --text FILE"),
    (["lm", "build", "--text", "/nonexistent.txt", "--out", "X"], "text file not found"),
    (["lm", "build", "--text", "README.md", "--out", "X", "--order", "1"], "2<=x<=6"),
    (["eval", "--checkpoint", "c.pt", "--shards", "s", "--lm-weight", "1"], "go with --lm"),
])
def test_lm_user_errors(tmp_path: Path, args: list[str], message: str, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    code, output = run_cli(*args)
    assert code == 2 and message in output


def test_lm_of_a_million_sentences_is_fast(tmp_path: Path) -> None:
    """Not a timing test (benchmarks are in the README): a scale smoke test that the counting is vectorised."""
    rng = np.random.default_rng(0)
    vocab = np.array([f"W{chr(65 + i % 26)}{chr(65 + i // 26 % 26)}" for i in range(2000)])
    lines = [" ".join(vocab[rng.zipf(1.5, rng.integers(3, 12)) % 2000]) for _ in range(50_000)]
    info = build_lm(lines, tmp_path / "lm", 3)
    assert info["sentences"] == 50_000 and info["ngrams"][0] > 500 and info["ngrams"][2] > info["ngrams"][1]
    assert math.isfinite(float((tmp_path / "lm" / "lm.arpa").read_text().splitlines()[-3].split("\t")[0]))
