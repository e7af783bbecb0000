"""Reading the input corpus with lhotse: the GigaSpeech recipe, or any lhotse CutSet manifest.

``lhotse.recipes.prepare_gigaspeech`` is used as is. Two of its behaviours do not fit a prep that must never lose
an utterance silently nor die on one bad entry, so they are watched:

* ``fix_manifests`` *trims* supervisions that run past the recording's declared end (their transcript then covers
  audio that is not there) and *drops* those that start after it, logging only a count. When it reports either,
  we audit the subset's segments against the declared durations and reject every such segment by name.
* it asserts (and the whole recipe stops) when an audio entry is left with no supervisions. Then we fall back to
  the recipe's own per-entry parser (``lhotse.recipes.gigaspeech.parse_utterance``) one recording at a time,
  skipping and reporting the broken entries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO

from lmu_asr import UserError
from lmu_asr.fileio import atomic_write
from lmu_asr.prep.plan import GIGASPEECH_SUBSETS, RANGE_TOLERANCE, reject, sanitize_key

log = logging.getLogger(__name__)


class _LhotseNotes(logging.Handler):
    """Collects the root-logger warnings fix_manifests emits about removed/trimmed supervisions."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "supervisions" in msg and ("Removed" in msg or "Trimmed" in msg):
            self.messages.append(msg)


def check_gigaspeech_dir(corpus_dir: Path, subset: str) -> str:
    """Validate the corpus directory and subset name; returns the canonical (upper-case) subset."""
    if not corpus_dir.is_dir():
        raise UserError(f"corpus directory not found: {corpus_dir}")
    if not (corpus_dir / "GigaSpeech.json").is_file():
        raise UserError(f"{corpus_dir} has no GigaSpeech.json (expected the official GigaSpeech layout)")
    canonical = subset.upper()
    if canonical not in GIGASPEECH_SUBSETS:
        raise UserError(f"unknown GigaSpeech subset {subset!r}; choose from "
                        f"{', '.join(s.lower() for s in GIGASPEECH_SUBSETS)}")
    return canonical


def _audios(corpus_dir: Path, subset: str):  # noqa: ANN202 (generator of speechcolab dicts)
    from speechcolab.datasets.gigaspeech import GigaSpeech

    return GigaSpeech(corpus_dir).audios("{" + subset + "}")


def _out_of_range(audio: dict) -> list[dict]:
    """Segments of one GigaSpeech.json audio entry that do not lie inside the declared recording."""
    duration = float(audio["duration"])
    bad = []
    for seg in audio["segments"]:
        begin, end = float(seg["begin_time"]), float(seg["end_time"])
        if begin < -RANGE_TOLERANCE or end > duration + RANGE_TOLERANCE or end <= begin:
            bad.append(reject(sanitize_key(seg["sid"]), audio["aid"], "out_of_range",
                              f"{begin:.2f}-{end:.2f}s of a {duration:.2f}s recording"))
    return bad


def _parse_error(corpus_dir: Path, err: Exception) -> UserError:
    return UserError(f"cannot read {corpus_dir / 'GigaSpeech.json'}: {type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''}")


def audit_gigaspeech(corpus_dir: Path, subset: str) -> list[dict]:
    """Every out-of-range segment of the subset, from GigaSpeech.json itself."""
    try:
        return [r for audio in _audios(corpus_dir, subset) for r in _out_of_range(audio)]
    except Exception as err:  # ijson raises its own error types for a damaged file
        raise _parse_error(corpus_dir, err) from None


def gigaspeech_cuts_per_entry(corpus_dir: Path, subset: str) -> tuple[list, list[dict]]:
    """Fallback: the recipe's parser one audio entry at a time; broken entries are rejected, not fatal."""
    from lhotse import CutSet, RecordingSet, SupervisionSet
    from lhotse.recipes.gigaspeech import parse_utterance

    cuts, rejected = [], []
    try:
        for audio in _audios(corpus_dir, subset):
            bad = _out_of_range(audio)
            rejected.extend(bad)
            bad_keys = {r["key"] for r in bad}
            try:
                recording, segments = parse_utterance(audio, corpus_dir)
                segments = [s for s in segments if sanitize_key(s.id) not in bad_keys]
                if segments:
                    cuts.extend(CutSet.from_manifests(RecordingSet.from_recordings([recording]),
                                                      SupervisionSet.from_segments(segments)))
            except Exception as err:  # one malformed entry must not stop the subset
                rejected.extend(reject(sanitize_key(s.get("sid", "?")), str(audio.get("aid", "?")),
                                       "bad_manifest_entry", f"{type(err).__name__}: {err}")
                                for s in audio.get("segments", []))
    except UserError:
        raise
    except Exception as err:
        raise _parse_error(corpus_dir, err) from None
    return cuts, rejected


def load_gigaspeech(corpus_dir: Path, subset: str, manifest_dir: Path, jobs: int) -> tuple[object, list[dict],
                                                                                           set[str], list[str]]:
    """Cuts of a GigaSpeech subset via lhotse's recipe. Returns (cuts, rejected, keys to drop, notes).

    lhotse writes its manifests into ``manifest_dir.partial``, which is renamed to ``manifest_dir`` only once the
    recipe has returned: a kill -9 inside lhotse's writers (which leaves 0-byte ``*.jsonl.gz`` files) can never
    be mistaken for a cache by the next run, which starts the recipe over.
    """
    from lhotse import CutSet
    from lhotse.recipes import prepare_gigaspeech

    cached = manifest_dir / f"gigaspeech_cuts_{subset}.jsonl.gz"
    if cached.is_file():
        # lhotse (1.33) returns no "cuts" for a subset whose manifests are cached, so read them directly; the
        # audit below is repeated because the recipe's warnings are not.
        return CutSet.from_file(cached), *_audit_if_needed(corpus_dir, subset, cached), []
    partial = manifest_dir.with_name(manifest_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(manifest_dir, ignore_errors=True)  # an old layout's directory without this subset's cuts
    notes: list[str] = []
    handler = _LhotseNotes()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        prepare_gigaspeech(corpus_dir, partial, dataset_parts=[subset], num_jobs=jobs)
    except Exception as err:  # AssertionError from fix_manifests on a malformed entry
        shutil.rmtree(partial, ignore_errors=True)  # never taken as cached next time
        notes.append(f"lhotse's prepare_gigaspeech stopped ({type(err).__name__}: {str(err)[:120]}); "
                     "parsed GigaSpeech.json one recording at a time instead")
        log.warning(notes[-1])
        cuts, rejected = gigaspeech_cuts_per_entry(corpus_dir, subset)
        return cuts, rejected, set(), notes
    finally:
        root.removeHandler(handler)
    if handler.messages:
        atomic_write(partial / f"gigaspeech_audit_{subset}.flag", "\n".join(handler.messages))
    os.replace(partial, manifest_dir)
    cuts = CutSet.from_file(cached)
    if handler.messages:
        notes.extend(f"lhotse: {m}" for m in handler.messages)
        rejected = audit_gigaspeech(corpus_dir, subset)
        return cuts, rejected, {r["key"] for r in rejected}, notes
    return cuts, [], set(), notes


class _HashingReader:
    """A binary file wrapper that hashes every byte it hands to the JSON parser (one pass for both)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data


REQUIRED_AUDIO = {"aid": str, "path": str, "duration": (int, float, Decimal), "sample_rate": (int, float, Decimal),
                  "channels": (int, Decimal), "subsets": list, "segments": list}
REQUIRED_SEGMENT = {"sid": str, "begin_time": (int, float, Decimal), "end_time": (int, float, Decimal),
                    "text_tn": str, "subsets": list}


def entry_problem(audio: object) -> str | None:
    """Why one ``audios`` entry does not follow the GigaSpeech schema lhotse's recipe reads, or None."""
    if not isinstance(audio, dict):
        return "an entry of 'audios' is not an object"
    for name, kind in REQUIRED_AUDIO.items():
        if not isinstance(audio.get(name), kind):
            return f"audio {audio.get('aid', '?')}: field {name!r} is missing or not a {_kind(kind)}"
    for seg in audio["segments"]:
        if not isinstance(seg, dict):
            return f"audio {audio['aid']}: a segment is not an object"
        for name, kind in REQUIRED_SEGMENT.items():
            if not isinstance(seg.get(name), kind):
                return f"segment {seg.get('sid', '?')}: field {name!r} is missing or not a {_kind(kind)}"
    return None


def _kind(kind: type | tuple) -> str:
    return "number" if isinstance(kind, tuple) else {"str": "string", "list": "list"}[kind.__name__]


def validate_gigaspeech_json(corpus_dir: Path) -> dict[str, object]:
    """Parse all of GigaSpeech.json once, streaming: its sha256, and its entries checked against the schema.

    A truncated or invalid file, or one without a single well-formed ``audios`` entry, is a :class:`UserError`:
    lhotse's recipe would otherwise read the part before the damage and return a partial corpus (with a traceback
    from one of its threads, and exit 0). Malformed single entries are only counted here; prep rejects their
    segments with a reason (``bad_manifest_entry``).
    """
    import ijson

    path = corpus_dir / "GigaSpeech.json"
    audios = bad = 0
    first_problem = None
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            for audio in ijson.items(reader, "audios.item"):
                audios += 1
                problem = entry_problem(audio)
                if problem:
                    bad += 1
                    first_problem = first_problem or problem
            while reader.read(1 << 20):  # hash what follows the audios list too
                pass
    except ijson.JSONError as err:
        reason = "it ends before the JSON is complete (truncated)" if "incomplete" in str(err).lower() or \
            "premature" in str(err).lower() else f"it is not valid JSON ({str(err).strip()[:80]})"
        raise UserError(f"cannot use {path}: {reason}; nothing was written") from None
    if audios == 0:
        raise UserError(f"{path} has no 'audios' list: it does not follow the GigaSpeech schema")
    if bad == audios:
        raise UserError(f"{path} does not follow the GigaSpeech schema: {first_problem}")
    if bad:
        log.warning("%s: %d of %d audio entries are malformed (first: %s); their segments are rejected", path,
                    bad, audios, first_problem)
    return {"sha256": reader.sha.hexdigest(), "audios": audios, "malformed": bad}


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def _audit_if_needed(corpus_dir: Path, subset: str, cached: Path) -> tuple[list[dict], set[str]]:
    """For cached manifests: repeat the audit if the recipe had reported trimmed/removed supervisions."""
    if not (cached.parent / f"gigaspeech_audit_{subset}.flag").is_file():
        return [], set()
    rejected = audit_gigaspeech(corpus_dir, subset)
    return rejected, {r["key"] for r in rejected}


def load_cutset(path: Path):  # noqa: ANN201 (lhotse CutSet)
    """Any lhotse CutSet manifest (jsonl, jsonl.gz, ...), read lazily."""
    from lhotse import CutSet

    if not path.is_file():
        raise UserError(f"cuts manifest not found: {path}")
    try:
        return CutSet.from_file(path)
    except Exception as err:
        raise UserError(f"cannot read cuts manifest {path}: {type(err).__name__}: {err}") from None
