"""Helpers shared by tests: where the real speech lives, and how to read it."""

from __future__ import annotations

import csv
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
