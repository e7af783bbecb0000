"""Planning prep: lhotse manifests -> recordings with segments -> rejections -> groups -> shard assignment.

Everything here is metadata only (no audio is decoded), deterministic given the manifests and the seed, and cheap
to recompute; that is what makes prep restartable: a resumed run recomputes the same plan and skips the groups
whose shards are already complete.

Shuffling across shards: recordings are shuffled and packed into *groups* of ``shuffle_group`` shards' worth of
frames; after a group's features are computed its segments are shuffled and dealt to its shards, each to the
shard with the fewest frames so far. Every shard therefore holds a random sample of segments from many random
recordings, shards hold nearly equal frames, and memory is bounded by one group.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmu_asr.prep.features import num_frames
from lmu_asr.prep.shards import MAX_KEY_LEN
from lmu_asr.text import GARBAGE_TAGS, normalize_transcript

log = logging.getLogger(__name__)

GIGASPEECH_SUBSETS = ("XS", "S", "M", "L", "XL", "DEV", "TEST")
MIN_SEGMENT_FRAMES = 5  # 50 ms: shorter segments cannot hold a word
RANGE_TOLERANCE = 0.02  # seconds a segment may run past the recording's declared end (rounding in manifests)


@dataclass(slots=True)  # millions of them at GigaSpeech-XL size: no per-instance __dict__
class Segment:
    key: str
    recording_id: str
    start: float
    duration: float
    num_frames: int
    text: str
    speaker: str
    channel: int | None = None


@dataclass
class RecordingJob:
    """One recording to decode once, with the segments to cut from its features."""

    recording_id: str
    path: str | None  # a local file soundfile can try first; None: load through lhotse
    recording: dict  # lhotse Recording.to_dict(), for the lhotse fallback and the sample rate
    duration: float
    segments: list[Segment] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return sum(s.num_frames for s in self.segments)


@dataclass
class Group:
    index: int
    recordings: list[RecordingJob]
    first_shard: int
    num_shards: int
    assignment: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (shard index, position)


def reject(key: str, recording: str, reason: str, detail: str = "") -> dict[str, str]:
    return {"key": key, "recording": recording, "reason": reason, "detail": detail}


def sanitize_key(raw: str) -> str:
    """A WebDataset-safe key: no dots or slashes, at most MAX_KEY_LEN characters (long ids get a stable hash)."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", raw)
    if len(key) > MAX_KEY_LEN:
        key = key[: MAX_KEY_LEN - 17] + "_" + hashlib.sha1(raw.encode()).hexdigest()[:16]
    return key


def _file_source(recording) -> str | None:  # noqa: ANN001 (lhotse Recording)
    if len(recording.sources) == 1 and recording.sources[0].type == "file":
        return str(recording.sources[0].source)
    return None


def _is_garbage_only(raw: str) -> bool:
    words = raw.upper().split()
    return bool(words) and all(w in GARBAGE_TAGS or w.startswith("<") for w in words)


def recordings_from_cuts(cuts: Iterable, skip: set[str] | frozenset[str] = frozenset(), sample_rate: int = 16_000
                         ) -> tuple[list[RecordingJob], list[dict]]:
    """Group every supervision of a CutSet by recording; reject what cannot become a training utterance.

    ``skip``: keys already rejected upstream (e.g. segments lhotse trimmed), left out without a second record.

    Works for GigaSpeech-style cuts (one cut per recording, many supervisions) and LibriSpeech-style cuts (one
    supervision per cut) alike: a supervision's absolute position is ``cut.start + sup.start``.
    """
    jobs: dict[str, RecordingJob] = {}
    rejected: list[dict] = []
    seen: set[str] = set()
    for cut in cuts:
        recording = getattr(cut, "recording", None)
        if recording is None or not hasattr(cut, "supervisions") or type(cut).__name__ != "MonoCut":
            rejected.append(reject(getattr(cut, "id", "?"), "", "unsupported_cut",
                                   f"{type(cut).__name__} without a single recording"))
            continue
        job = jobs.get(recording.id)
        if job is None:
            job = jobs[recording.id] = RecordingJob(recording.id, _file_source(recording), recording.to_dict(),
                                                    float(recording.duration))
        for sup in cut.supervisions:
            key = sanitize_key(sup.id)
            if key in skip:
                continue
            if key in seen:
                rejected.append(reject(key, recording.id, "duplicate_key", f"supervision id {sup.id!r}"))
                continue
            seen.add(key)
            start, dur = float(cut.start + sup.start), float(sup.duration)
            raw = sup.text or ""
            text = normalize_transcript(raw)
            if not text:
                reason = "no_speech_text" if _is_garbage_only(raw) else "empty_transcript"
                rejected.append(reject(key, recording.id, reason, raw[:80]))
            elif dur <= 0:
                rejected.append(reject(key, recording.id, "zero_length", f"duration {dur}"))
            elif start < -RANGE_TOLERANCE or start + dur > job.duration + RANGE_TOLERANCE:
                rejected.append(reject(key, recording.id, "out_of_range",
                                       f"{start:.2f}-{start + dur:.2f}s of a {job.duration:.2f}s recording"))
            elif num_frames(dur, sample_rate=sample_rate) < MIN_SEGMENT_FRAMES:
                rejected.append(reject(key, recording.id, "too_short", f"{dur:.3f}s"))
            else:
                channel = sup.channel if isinstance(sup.channel, int) else None
                job.segments.append(Segment(key, recording.id, max(start, 0.0), dur,
                                            num_frames(dur, sample_rate=sample_rate), text, sup.speaker or
                                            recording.id, channel))
    return [j for j in jobs.values() if j.segments], rejected


def plan_groups(jobs: list[RecordingJob], shard_frames: int, shuffle_group: int, seed: int) -> list[Group]:
    """Shuffle recordings into groups of ~``shuffle_group`` shards' frames and assign segments to shards."""
    if shard_frames <= 0 or shuffle_group <= 0:
        raise ValueError("shard_frames and shuffle_group must be positive")
    rng = np.random.default_rng(seed)
    order = sorted(jobs, key=lambda j: j.recording_id)  # input order must not matter, only the seed
    order = [order[i] for i in rng.permutation(len(order))]
    budget = shard_frames * shuffle_group
    groups: list[Group] = []
    current: list[RecordingJob] = []
    frames = 0
    for job in order:
        current.append(job)
        frames += job.frames
        if frames >= budget:
            groups.append(Group(len(groups), current, 0, 0))
            current, frames = [], 0
    if current:
        if groups and frames < budget / 2:  # a small tail would make a poorly mixed, undersized shard
            groups[-1].recordings.extend(current)
        else:
            groups.append(Group(len(groups), current, 0, 0))
    next_shard = 0
    for group in groups:
        total = sum(j.frames for j in group.recordings)
        group.num_shards = max(1, round(total / shard_frames))
        group.first_shard = next_shard
        next_shard += group.num_shards
        _assign(group, np.random.default_rng([seed, group.index]))
    return groups


def _assign(group: Group, rng: np.random.Generator) -> None:
    """Shuffle the group's segments and deal each to the shard with the fewest frames (ties: lowest index)."""
    segments = [s for job in group.recordings for s in job.segments]
    load = [0] * group.num_shards
    count = [0] * group.num_shards
    for i in rng.permutation(len(segments)):
        seg = segments[i]
        k = min(range(group.num_shards), key=lambda j: (load[j], j))
        group.assignment[seg.key] = (group.first_shard + k, count[k])
        load[k] += seg.num_frames
        count[k] += 1


def load_gigaspeech_cuts(corpus_dir: Path, subset: str, manifest_dir: Path, jobs: int):  # noqa: ANN201
    """Run lhotse's GigaSpeech recipe for one subset (manifests cached in ``manifest_dir``); returns its cuts."""
    from lhotse.recipes import prepare_gigaspeech

    manifests = prepare_gigaspeech(corpus_dir, manifest_dir, dataset_parts=[subset], num_jobs=jobs)
    return manifests[subset]["cuts"]
