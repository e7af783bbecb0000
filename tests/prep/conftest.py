"""A miniature GigaSpeech corpus built once per test session from the real recordings in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmu_asr.cli import main
from lmu_asr.prep.minicorpus import build_gigaspeech_corpus, speech_dir_utterances
from lmu_asr.text import normalize_transcript
from tests.helpers import FSDD, LJSPEECH, require_corpus

SHARD_FRAMES = "2000"  # small shards, so the mini corpus spans several shards and groups


def fsdd_subset(row: dict) -> str | None:
    """Recording index 0-1 TEST, 2 DEV, 3-6 XS, 7-9 S; the rest is left out to keep the corpus small."""
    idx = int(row["utt_id"].rsplit("_", 1)[1])
    return {0: "TEST", 1: "TEST", 2: "DEV"}.get(idx, "XS" if 3 <= idx <= 6 else "S" if idx <= 9 else None)


@pytest.fixture(scope="session")
def mini_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_corpus(FSDD)
    require_corpus(LJSPEECH)
    out = tmp_path_factory.mktemp("gigaspeech_mini")
    utts = speech_dir_utterances(FSDD, fsdd_subset)
    utts += speech_dir_utterances(LJSPEECH, lambda row: "XS" if row["utt_id"] < "LJ001-0010" else None)
    build_gigaspeech_corpus(utts, out, seed=1)
    return out


def expected_segments(corpus: Path, subset: str) -> dict[str, str]:
    """sid -> raw text_tn of every segment in a subset, straight from GigaSpeech.json."""
    meta = json.loads((corpus / "GigaSpeech.json").read_text())
    tag = "{" + subset.upper() + "}"
    return {s["sid"]: s["text_tn"] for a in meta["audios"] for s in a["segments"] if tag in s["subsets"]}


def expected_texts(corpus: Path, subset: str) -> dict[str, str]:
    """sid -> training text for every segment that should be kept."""
    out = {}
    for sid, raw in expected_segments(corpus, subset).items():
        text = normalize_transcript(raw)
        if text:
            out[sid] = text
    return out


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="session")
def xs_shards(mini_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "xs"
    code, output = run_cli("prep", "--corpus-dir", str(mini_corpus), "--subset", "XS", "--out", str(out),
                           "--shard-frames", SHARD_FRAMES, "--shuffle-group", "2", "--jobs", "2", "--no-progress")
    assert code == 0, output
    return out
