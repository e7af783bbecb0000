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

import logging
from pathlib import Path

from lmu_asr import UserError
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
    """Cuts of a GigaSpeech subset via lhotse's recipe. Returns (cuts, rejected, keys to drop, notes)."""
    from lhotse import CutSet
    from lhotse.recipes import prepare_gigaspeech

    cached = manifest_dir / f"gigaspeech_cuts_{subset}.jsonl.gz"
    if cached.is_file():
        # lhotse (1.33) returns no "cuts" for a subset whose manifests are cached, so read them directly; the
        # audit below is repeated because the recipe's warnings are not.
        return CutSet.from_file(cached), *_audit_if_needed(corpus_dir, subset, cached), []
    notes: list[str] = []
    handler = _LhotseNotes()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        manifests = prepare_gigaspeech(corpus_dir, manifest_dir, dataset_parts=[subset], num_jobs=jobs)
        cuts = manifests[subset]["cuts"]
    except Exception as err:  # AssertionError from fix_manifests, or a damaged JSON
        for stale in manifest_dir.glob(f"gigaspeech_*_{subset}.jsonl.gz"):
            stale.unlink()  # a half-written manifest must not be taken as cached next time
        notes.append(f"lhotse's prepare_gigaspeech stopped ({type(err).__name__}: {str(err)[:120]}); "
                     "parsed GigaSpeech.json one recording at a time instead")
        log.warning(notes[-1])
        cuts, rejected = gigaspeech_cuts_per_entry(corpus_dir, subset)
        return cuts, rejected, set(), notes
    finally:
        root.removeHandler(handler)
    if handler.messages:
        notes.extend(f"lhotse: {m}" for m in handler.messages)
        rejected = audit_gigaspeech(corpus_dir, subset)
        (manifest_dir / f"gigaspeech_audit_{subset}.flag").write_text("\n".join(handler.messages))
        return cuts, rejected, {r["key"] for r in rejected}, notes
    return cuts, [], set(), notes


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
