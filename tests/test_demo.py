"""lmuasr demo (built-in corpus, quick), its user errors, and the synthesiser behind the built-in corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmu_asr.demo import (
    BUILTIN_EPOCHS,
    SPEECH_DIR_EPOCHS,
    DemoOptions,
    adapt_by_default,
    demo_epochs,
    speed_perturbed,
)
from lmu_asr.prep.minicorpus import SourceUtterance
from lmu_asr.prep.synth import ACCENTS, SynthSpec, render, sentence, synthetic_utterances, voices
from lmu_asr.text import encode, normalize_transcript
from tests.helpers import FSDD, run_cli


def test_grammar_and_voices() -> None:
    rng = np.random.default_rng(0)
    texts = [sentence(rng) for _ in range(500)]
    for t in texts:
        assert normalize_transcript(t) == t  # what eSpeak is asked to say is exactly the target
        encode(t)
    assert len(set(texts)) > 400 and len({w for t in texts for w in t.split()}) > 150  # varied, not trivial
    spec = SynthSpec()
    train, unseen = set(voices(spec, False)), set(voices(spec, True))
    assert train and unseen and not train & unseen
    assert all(v.split("+")[0] in ACCENTS for v in train | unseen)


def test_synthesis_is_deterministic_and_held_out() -> None:
    spec = SynthSpec(xs=4, dev=2, test=2, seed=3)
    a, b = synthetic_utterances(spec), synthetic_utterances(spec)
    assert [(u.utt_id, u.speaker, u.text) for u in a] == [(u.utt_id, u.speaker, u.text) for u in b]
    assert len({u.text for u in a}) == len(a)
    for x, y in zip(a, b, strict=True):
        # eSpeak NG carries state between calls (its audio drifts by a few samples with call history), so the
        # same utterance rendered later in a process is near-identical, not bit-identical
        assert abs(x.audio.size - y.audio.size) < 0.02 * x.audio.size
        assert x.audio.dtype == np.float32 and 0.3 < x.audio.size / 16000 < 15
    train_voices = {u.speaker for u in a if u.subset == "XS"}
    assert not train_voices & {u.speaker for u in a if u.subset in ("DEV", "TEST")}
    narrow = render("one two three", "en-us+m3", np.random.default_rng(0), narrowband_hz=8000)
    spectrum = np.abs(np.fft.rfft(narrow))
    freqs = np.fft.rfftfreq(narrow.size, 1 / 16000)
    assert spectrum[freqs > 4500].mean() < 0.01 * spectrum[(freqs > 300) & (freqs < 3500)].mean()


def test_breathy_voices_repeat_across_processes() -> None:
    """Voices with breath noise (f3, Alicia, victor) draw from eSpeak's own generator, which every process seeded
    differently: the same corpus came out different on every run. Seeded per utterance, two fresh processes
    render the same samples (a plain voice too)."""
    code = ("import hashlib, numpy as np\n"
            "from lmu_asr.prep.synth import render\n"
            "for v in ('en+f3', 'en-us+Alicia', 'en+victor', 'en-us+m3'):\n"
            "    a = render('seven eight nine', v, np.random.default_rng(1))\n"
            "    print(v, hashlib.sha256(a.tobytes()).hexdigest())\n")
    runs = [_python(code) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].splitlines()) == 4


def test_synthesis_threads_change_nothing() -> None:
    """eSpeak stays on the calling thread in a fixed order and the resampling moves to worker threads: one worker
    and three give the same corpus, sample for sample (fresh processes: eSpeak's output depends on call history)."""
    code = ("import hashlib, sys\n"
            "from lmu_asr.prep.synth import SynthSpec, synthetic_utterances\n"
            "utts = synthetic_utterances(SynthSpec(xs=24, dev=3, test=3, seed=5, narrowband_hz=8000), "
            "jobs=int(sys.argv[1]))\n"
            "print(len(utts), hashlib.sha256(b''.join(u.audio.tobytes() + u.text.encode() for u in utts)).hexdigest())\n")
    one, three = _python(code, "1"), _python(code, "3")
    assert one == three and one.startswith("30 ")


def _python(code: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturbation_scales_tempo_and_pitch(factor: float) -> None:
    t = np.arange(32_000) / 16_000
    utt = SourceUtterance("u1", "spk", "ONE", "XS", np.sin(2 * np.pi * 440 * t).astype(np.float32))
    (fast,) = speed_perturbed([utt], [factor])
    assert (fast.utt_id, fast.speaker, fast.text, fast.subset) == (f"u1_sp{factor:g}", f"spk_sp{factor:g}", "ONE",
                                                                   "XS")
    assert abs(fast.audio.size - 32_000 / factor) <= 2
    spectrum = np.abs(np.fft.rfft(fast.audio[1000:-1000]))
    peak = np.fft.rfftfreq(fast.audio.size - 2000, 1 / 16_000)[spectrum.argmax()]
    assert peak == pytest.approx(440 * factor, abs=2)


def test_demo_epochs_by_corpus_and_flags(tmp_path: Path) -> None:
    from lmu_asr.config import load_config

    assert demo_epochs(DemoOptions(out=tmp_path)) == BUILTIN_EPOCHS
    # adaptation to the test voices: on for a speech folder, off for the built-in corpus, either way when asked
    assert (adapt_by_default(DemoOptions(out=tmp_path)), adapt_by_default(DemoOptions(out=tmp_path, speech_dir=tmp_path))
            ) == (False, True)
    assert adapt_by_default(DemoOptions(out=tmp_path, adapt=True))
    assert not adapt_by_default(DemoOptions(out=tmp_path, speech_dir=tmp_path, adapt=False))
    assert demo_epochs(DemoOptions(out=tmp_path, speech_dir=tmp_path)) == SPEECH_DIR_EPOCHS != BUILTIN_EPOCHS
    assert demo_epochs(DemoOptions(out=tmp_path, speech_dir=tmp_path, quick=True)) == 8
    assert demo_epochs(DemoOptions(out=tmp_path, speech_dir=tmp_path, epochs=3)) == 3
    # --set train.epochs=N is applied after the demo's default, as run_demo merges them
    sets = {"train.epochs": "5"}
    assert load_config("cpu-small", None, {"train.epochs": demo_epochs(DemoOptions(out=tmp_path)), **sets}
                       ).train.epochs == 5


def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code, output = run_cli("demo", "--quick", "--vtln", "--adapt", "--out", str(out), "--no-progress")
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert "lmu-asr demo: done" in output and str(out / "report.md") in output
    best = list((out / "run" / "checkpoints").glob("checkpoint_epoch_*_best.pt"))
    assert len(best) == 1 and summary["checkpoint"] == str(best[0])
    assert 0 <= summary["test"]["greedy"]["wer"] <= 1.5 and summary["test"]["greedy"]["utterances"] >= 40
    assert len(summary["transcripts"]) == 3 and all(t["reference"] for t in summary["transcripts"])
    report = (out / "report.md").read_text()
    assert "| greedy |" in report and "| beam8 |" in report and (out / "run" / "curves.png").is_file()
    # one entry per decoder, LM by default; --vtln scores greedy and the LM again with one warp per test speaker
    # and --adapt scores greedy and the LM again after adapting a copy of the model to TEST's audio
    assert set(summary["test"]) == {"greedy", "beam8", "beam512+lm", "greedy+vtln", "beam512+lm+vtln",
                                    "greedy+adapt", "beam512+lm+adapt"}
    adapted = summary["adapt"]
    assert Path(adapted["checkpoint"]).is_file() and adapted["decoder"] == "beam512+lm" and len(adapted["kept"]) == 3
    assert "lmuasr adapt --checkpoint" in output and "Rows `+adapt`" in report
    assert summary["test"]["greedy+adapt"]["utterances"] == summary["test"]["greedy"]["utterances"]
    warps = json.loads((out / "run" / "eval_test.json").read_text())["greedy+vtln"]["warps"]
    assert len(warps) >= 2 and "speaker warps (VTLN)" in output and summary["vtln"]["warps"] == warps
    assert summary["test"]["greedy+vtln"]["utterances"] == summary["test"]["greedy"]["utterances"]
    assert all(set(v) >= {"wer", "cer", "utterances"} for v in summary["test"].values())
    assert "| beam512+lm |" in report and "chosen on DEV" in report
    # the error analysis: its counts add up to the best decoder's scored errors, by the user's speaker names
    analysis, scored = summary["analysis"], json.loads((out / "run" / "eval_test.json").read_text())
    best_scored = scored[analysis["decoder"]]
    assert analysis["decoder"] != "beam8" and best_scored["wer"] == min(v["wer"] for k, v in scored.items()
                                                                         if v.get("hypotheses"))
    assert analysis["word_errors"] == best_scored["word_errors"]
    speakers = analysis["per_speaker"]
    assert sum(v["ref_words"] for v in speakers.values()) == best_scored["ref_words"] and len(speakers) >= 2
    assert sum(v["word_errors"] for v in speakers.values()) == best_scored["word_errors"]
    assert "?" not in speakers and all(f"| {spk} |" in report for spk in speakers)
    table = report[report.index("## Some test errors"):report.index("## Time")]
    assert "AUD" not in table  # the corpus's segment ids are mapped back to the utterances' own
    lexicon = {line.split("\t")[0] for line in (out / "lm" / "lexicon.txt").read_text().splitlines()}
    assert all(w in lexicon for t in summary["transcripts"] for w in t["hypothesis"].split())  # LM-decoded
    code, output = run_cli("transcribe", "--checkpoint", str(best[0]), "--lm", str(out / "lm"),
                           *summary["transcripts"][0]["file"].split())  # the LM's tuned weights are in its folder
    assert code == 0 and output.split("\t")[1].strip() == summary["transcripts"][0]["hypothesis"]
    code, output = run_cli("demo", "--quick", "--out", str(out), "--no-progress", "--seed", "9")
    assert code == 2 and "other options" in output


def test_demo_seed_seeds_training_too_and_set_wins(tmp_path: Path) -> None:
    """--seed 0 trains the preset's seed (the README's runs); --seed N moves the training seed with it; --set still
    wins over everything the demo chooses."""
    from lmu_asr.config import TrainConfig, load_config
    from lmu_asr.demo import train_overrides

    seeds = {n: load_config("cpu-small", None, train_overrides(DemoOptions(out=tmp_path, seed=n))).train.seed
             for n in (0, 1, 5)}
    assert seeds == {0: TrainConfig().seed, 1: TrainConfig().seed + 1, 5: TrainConfig().seed + 5}
    given = DemoOptions(out=tmp_path, seed=3, overrides={"train.seed": 7, "train.keep_epoch_checkpoints": 0})
    cfg = load_config("cpu-small", None, train_overrides(given))
    assert (cfg.train.seed, cfg.train.keep_epoch_checkpoints, cfg.train.epochs) == (7, 0, BUILTIN_EPOCHS)
    # a speech folder trains longer and with two frequency-convolution layers (the built-in corpus keeps one)
    assert (cfg.model.freq_conv_layers, cfg.model.freq_conv) == (1, 16)
    model_of = lambda o: load_config("cpu-small", None, train_overrides(o)).model  # noqa: E731
    folder = DemoOptions(out=tmp_path, speech_dir=tmp_path)
    assert model_of(folder).freq_conv_layers == 2 and train_overrides(folder)["train.epochs"] == SPEECH_DIR_EPOCHS
    folder.overrides = {"model.freq_conv_layers": 1}
    assert model_of(folder).freq_conv_layers == 1


@pytest.mark.parametrize("args,message", [
    (["--speech-dir", str(FSDD), "--test-speakers", "nobody"], "no speaker nobody"),
    (["--speech-dir", str(FSDD), "--test-pattern", "(["], "not a valid regular expression"),
    (["--speech-dir", str(FSDD), "--test-pattern", "^never$"], "0 test utterances"),
    (["--test-speakers", "theo"], "need --speech-dir"),
    (["--speech-dir", "/nonexistent/dir"], "speech directory not found"),
    (["--speech-dir", str(FSDD), "--speed-perturb", "fast"], "expected factors like 0.9,1.1"),
    (["--speech-dir", str(FSDD), "--speed-perturb", "1.0"], "must lie in [0.5, 2] and differ from 1"),
])
def test_demo_user_errors(tmp_path: Path, args: list[str], message: str) -> None:
    if "--speech-dir" in args and str(FSDD) in args and not FSDD.exists():
        pytest.skip("needs ../shared/data/fsdd")
    code, output = run_cli("demo", "--out", str(tmp_path / "d"), *args)
    assert code == 2 and message in output and "Traceback" not in output
    assert not (tmp_path / "d" / "demo.json").exists()  # refused before --out records the options: a corrected
    # rerun into the same --out is not told that it "holds a demo run with other options"
