"""Shared test fixtures (the helpers themselves live in tests/helpers.py so tests can import them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import FSDD, LJSPEECH, require_corpus


@pytest.fixture(scope="session")
def fsdd() -> Path:
    return require_corpus(FSDD)


@pytest.fixture(scope="session")
def ljspeech() -> Path:
    return require_corpus(LJSPEECH)
