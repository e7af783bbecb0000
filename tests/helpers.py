"""Helpers shared by tests: where the real speech lives, and how to read it."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LMU_ASR_SHARED_DATA", ROOT.parent / "shared" / "data"))
FSDD = SHARED_DATA / "fsdd"
LJSPEECH = SHARED_DATA / "ljspeech32"

torch.set_num_threads(min(2, torch.get_num_threads()))


def require_corpus(path: Path) -> Path:
    """Skip (with the reason) when the shared real-speech corpora are not next to the checkout."""
    if not (path / "transcripts.tsv").is_file():
        pytest.skip(f"real speech corpus not found at {path} (expected ../shared/data beside the project root)")
    return path


def read_transcripts(corpus: Path) -> list[dict[str, str]]:
    with open(corpus / "transcripts.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def fsdd_subset(row: dict) -> str | None:
    """Recording index 0-1 TEST, 2 DEV, 3-6 XS, 7-9 S; the rest is left out to keep the corpus small."""
    idx = int(row["utt_id"].rsplit("_", 1)[1])
    return {0: "TEST", 1: "TEST", 2: "DEV"}.get(idx, "XS" if 3 <= idx <= 6 else "S" if idx <= 9 else None)


def expected_segments(corpus: Path, subset: str) -> dict[str, str]:
    """sid -> raw text_tn of every segment in a subset, straight from GigaSpeech.json."""
    meta = json.loads((corpus / "GigaSpeech.json").read_text())
    tag = "{" + subset.upper() + "}"
    return {s["sid"]: s["text_tn"] for a in meta["audios"] for s in a["segments"] if tag in s["subsets"]}


def expected_texts(corpus: Path, subset: str) -> dict[str, str]:
    """sid -> training text for every segment that should be kept."""
    from lmu_asr.text import normalize_transcript

    out = {}
    for sid, raw in expected_segments(corpus, subset).items():
        text = normalize_transcript(raw)
        if text:
            out[sid] = text
    return out


def run_cli(*args: str) -> tuple[int, str]:
    """Invoke ``lmuasr`` in-process; returns (exit code, combined output)."""
    from click.testing import CliRunner

    from lmu_asr.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output
