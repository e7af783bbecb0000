"""Shared test fixtures: a miniature GigaSpeech corpus built once per session from the real recordings in
../shared/data, and shard sets prepared from it (helpers live in tests/helpers.py so tests can import them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import FSDD, LJSPEECH, fsdd_subset, require_corpus, run_cli

SHARD_FRAMES = "2000"  # small shards, so the mini corpus spans several shards and groups


@pytest.fixture(scope="session")
def fsdd() -> Path:
    return require_corpus(FSDD)


@pytest.fixture(scope="session")
def ljspeech() -> Path:
    return require_corpus(LJSPEECH)


@pytest.fixture(scope="session")
def mini_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmu_asr.prep.minicorpus import build_gigaspeech_corpus, speech_dir_utterances

    require_corpus(FSDD)
    require_corpus(LJSPEECH)
    out = tmp_path_factory.mktemp("gigaspeech_mini")
    utts = speech_dir_utterances(FSDD, fsdd_subset)
    utts += speech_dir_utterances(LJSPEECH, lambda row: "XS" if row["utt_id"] < "LJ001-0010" else None)
    build_gigaspeech_corpus(utts, out, seed=1)
    return out


def _prep(corpus: Path, out: Path, subset: str, *extra: str) -> Path:
    code, output = run_cli("prep", "--corpus-dir", str(corpus), "--subset", subset, "--out", str(out),
                           "--no-progress", *extra)
    assert code == 0, output
    return out


@pytest.fixture(scope="session")
def xs_shards(mini_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prep(mini_corpus, tmp_path_factory.mktemp("shards") / "xs", "XS", "--shard-frames", SHARD_FRAMES,
                 "--shuffle-group", "2", "--jobs", "2")


@pytest.fixture(scope="session")
def train_shards(mini_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Subset S (XS + S, ~450 FSDD utterances) in 3 shards: an odd count for the 2-rank tests."""
    return _prep(mini_corpus, tmp_path_factory.mktemp("shards") / "s", "S", "--shard-frames", "7000",
                 "--shuffle-group", "4")


@pytest.fixture(scope="session")
def dev_shards(mini_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prep(mini_corpus, tmp_path_factory.mktemp("shards") / "dev", "DEV")


# ---- synthetic speech (eSpeak NG, shipped with the package): for tests where real speech is not the point, so a
# ---- user without ../shared skips little
@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GigaSpeech-layout corpus of eSpeak utterances: 60 XS, 10 DEV, 10 TEST (built in a few seconds)."""
    from lmu_asr.prep.minicorpus import build_gigaspeech_corpus
    from lmu_asr.prep.synth import SynthSpec, synthetic_utterances

    out = tmp_path_factory.mktemp("synth_corpus")
    build_gigaspeech_corpus(synthetic_utterances(SynthSpec(xs=60, dev=10, test=10, seed=11)), out, seed=1)
    return out


@pytest.fixture(scope="session")
def synth_shards(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The XS subset in 4 shards (small ones, so damage to one shard leaves others)."""
    return _prep(synth_corpus, tmp_path_factory.mktemp("synth") / "xs", "XS", "--shard-frames", "3000",
                 "--shuffle-group", "2")


@pytest.fixture(scope="session")
def synth_dev(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prep(synth_corpus, tmp_path_factory.mktemp("synth") / "dev", "DEV")


@pytest.fixture(scope="session")
def tiny_run(synth_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cpu-tiny run of 4 steps on the synthetic shards (a real checkpoint for eval/transcribe/resume rows)."""
    run = tmp_path_factory.mktemp("synth") / "run"
    code, output = run_cli("train", "--shards", str(synth_shards), "--out", str(run), "--preset", "cpu-tiny",
                           "--max-steps", "4", "--save-every", "2", "--no-progress", "--workers", "0")
    assert code == 0, output
    return run


@pytest.fixture(scope="session")
def window_run(synth_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small window-attention model (streams exactly), trained long enough to say something."""
    run = tmp_path_factory.mktemp("window") / "run"
    code, output = run_cli("train", "--shards", str(synth_shards), "--out", str(run), "--preset", "cpu-tiny",
                           "--set", "model.attention=window", "--set", "model.attn_left=24", "--epochs", "6",
                           "--workers", "0", "--no-progress", "--lr", "3e-3")
    assert code == 0, output
    return run
