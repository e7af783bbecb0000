"""The miniature-corpus builder: its recordings are encoded on threads, so what it writes must not depend on them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lmu_asr.prep.minicorpus import SAMPLE_RATE, SourceUtterance, build_gigaspeech_corpus


def _utterances() -> list[SourceUtterance]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(40):
        t = np.arange(int(SAMPLE_RATE * rng.uniform(0.3, 0.9))) / SAMPLE_RATE
        tone = 0.2 * np.sin(2 * np.pi * rng.uniform(150, 900) * t) + 0.01 * rng.standard_normal(t.size)
        out.append(SourceUtterance(f"u{i:03d}", f"spk{i % 3}", "ONE TWO", "DEV" if i % 7 == 0 else "XS",
                                   tone.astype(np.float32)))
    return out


def _decoded(out: Path, meta: dict) -> list[np.ndarray]:
    return [sf.read(out / a["path"], dtype="float32")[0] for a in meta["audios"]]


@pytest.mark.parametrize("jobs", [1, 3])
def test_threaded_encoding_writes_the_serial_corpus(tmp_path: Path, jobs: int) -> None:
    """Every random draw stays on the calling thread: the json (but the md5s: an Ogg stream's serial number is
    random) and the decoded audio equal one encoder's; each listed md5 is its file's; no temporary file stays."""
    ref, out = tmp_path / "serial", tmp_path / f"jobs{jobs}"
    counts_ref = build_gigaspeech_corpus(_utterances(), ref, seed=3, jobs=1)
    counts = build_gigaspeech_corpus(_utterances(), out, seed=3, jobs=jobs)
    meta_ref = json.loads((ref / "GigaSpeech.json").read_text())
    meta = json.loads((out / "GigaSpeech.json").read_text())
    assert counts == counts_ref and counts["recordings"] == len(meta["audios"]) > 6
    for a in meta["audios"]:
        assert a["md5"] == hashlib.md5((out / a["path"]).read_bytes()).hexdigest()
    strip = lambda m: [{k: v for k, v in a.items() if k != "md5"} for a in m["audios"]]  # noqa: E731
    assert strip(meta) == strip(meta_ref)
    for x, y in zip(_decoded(out, meta), _decoded(ref, meta_ref), strict=True):
        assert np.array_equal(x, y)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_an_encoding_error_reaches_the_caller(tmp_path: Path) -> None:
    """A failure on an encoder thread (here: a file where a recording's folder should be) is raised, not lost,
    and no GigaSpeech.json claims the corpus is complete."""
    out = tmp_path / "corpus"
    (out / "audio" / "audiobook").mkdir(parents=True)
    (out / "audio" / "audiobook" / "P0000").write_text("not a folder")
    with pytest.raises(OSError):
        build_gigaspeech_corpus(_utterances(), out, seed=3, jobs=2)
    assert not (out / "GigaSpeech.json").exists()
