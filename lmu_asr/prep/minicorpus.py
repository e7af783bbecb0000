"""Build a miniature corpus in the official GigaSpeech layout from utterances (real recordings or synthesised).

The output is what ``lhotse.recipes.prepare_gigaspeech`` expects, so tests, the demo and the benchmarks run the
real recipe on it::

    OUT/GigaSpeech.json
    OUT/audio/{audiobook,podcast,youtube}/P0000/{AUD,POD,YOU}0000000001.opus

Like the real corpus, recordings are long: several utterances of one speaker are concatenated with silences in
between and listed as segments (``sid``, ``begin_time``, ``end_time``, ``text_tn``, ``subsets``). Segment texts
carry GigaSpeech punctuation tags and some recordings hold garbage segments (``<SIL>``, ``<NOISE>``, ``<MUSIC>``)
so that prep's normalisation and skip counting are exercised. Training subsets are nested as in GigaSpeech
(XS ⊂ S ⊂ M ⊂ L ⊂ XL); DEV and TEST are separate recordings.

One builder serves every source: :func:`speech_dir_utterances` reads a folder laid out like ``../shared/data/fsdd``
(``transcripts.tsv`` with ``utt_id path speaker text``); a synthesiser (``lmu_asr.prep.synth``) yields the same
:class:`SourceUtterance` records with audio in memory.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from lmu_asr import UserError
from lmu_asr.fileio import atomic_write, atomic_write_with
from lmu_asr.prep.features import SAMPLE_RATE, load_audio

TRAIN_LEVELS = ("XS", "S", "M", "L", "XL")
EVAL_SUBSETS = ("DEV", "TEST")
SOURCES = (("audiobook", "AUD"), ("podcast", "POD"), ("youtube", "YOU"))
GARBAGE = ("<SIL>", "<NOISE>", "<MUSIC>", "<OTHER>")


@dataclass
class SourceUtterance:
    """One utterance to place in the corpus. ``audio``: a file path (any format/rate) or 16 kHz float32 samples."""

    utt_id: str
    speaker: str
    text: str
    subset: str  # a training level (XS..XL: the smallest subset it belongs to) or DEV / TEST
    audio: Path | np.ndarray


def subsets_for(subset: str) -> list[str]:
    """GigaSpeech subset tags of an utterance: training levels are nested (XS is also in S, M, L, XL)."""
    subset = subset.upper()
    if subset in EVAL_SUBSETS:
        return ["{" + subset + "}"]
    if subset not in TRAIN_LEVELS:
        raise ValueError(f"unknown subset {subset!r}")
    return ["{" + s + "}" for s in TRAIN_LEVELS[TRAIN_LEVELS.index(subset):]]


def read_speech_dir(speech_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``DIR/transcripts.tsv`` (utt_id, path, speaker, text) with a one-line error if it is malformed."""
    speech_dir = Path(speech_dir)
    tsv = speech_dir / "transcripts.tsv"
    if not speech_dir.is_dir():
        raise UserError(f"speech directory not found: {speech_dir}")
    if not tsv.is_file():
        raise UserError(f"{speech_dir} has no transcripts.tsv (columns: utt_id, path, speaker, text)")
    with open(tsv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = {"utt_id", "path", "speaker", "text"} - set(rows[0].keys() if rows else [])
    if missing:
        raise UserError(f"{tsv} lacks column(s): {', '.join(sorted(missing))}")
    return rows


def speech_dir_utterances(speech_dir: str | Path, assign: Callable[[dict[str, str]], str | None]
                          ) -> list[SourceUtterance]:
    """Utterances of a transcripts.tsv folder; ``assign(row)`` gives each its subset (None: leave it out)."""
    speech_dir = Path(speech_dir)
    out = []
    for row in read_speech_dir(speech_dir):
        subset = assign(row)
        if subset is not None:
            out.append(SourceUtterance(row["utt_id"], row["speaker"], row["text"], subset,
                                       speech_dir / row["path"]))
    return out


def samples_of(utt: SourceUtterance) -> np.ndarray:
    """The utterance's 16 kHz float32 samples, whether it holds them or a path to any audio file."""
    if isinstance(utt.audio, np.ndarray):
        return utt.audio.astype(np.float32, copy=False)
    return load_audio(utt.audio)[0]


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _silence(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(round(seconds * 100)) * (SAMPLE_RATE // 100)  # whole 10 ms frames keep segment times on the grid
    return (rng.standard_normal(n) * 3e-4).astype(np.float32)  # a faint noise floor, like a real room


def build_gigaspeech_corpus(utterances: Iterable[SourceUtterance], out_dir: str | Path, *,
                            per_recording: tuple[int, int] = (6, 14), seed: int = 0,
                            garbage_prob: float = 0.15, punctuate: bool = True, jobs: int = 2) -> dict[str, int]:
    """Write GigaSpeech.json + opus recordings for ``utterances`` into ``out_dir``; returns counts.

    Utterances are grouped by (speaker, subset) into recordings of ``per_recording`` utterances (random within
    the range, seeded). The layout and JSON fields follow the official release closely enough for lhotse's
    recipe (and speechcolab's reader) to treat it as GigaSpeech.

    Opus encoding is most of the time (about 0.8 s a minute of audio); libsndfile releases the GIL, so ``jobs``
    threads encode recordings side by side (1.9x with two). Every random draw stays in this thread, in order, so
    the corpus is the same for any ``jobs``; at most ``2 * jobs`` recordings wait in memory.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[SourceUtterance]] = defaultdict(list)
    for utt in utterances:
        subsets_for(utt.subset)  # validates
        groups[(utt.speaker, utt.subset.upper())].append(utt)
    if not groups:
        raise UserError("no utterances to build a corpus from")
    audios, counts = [], {"recordings": 0, "segments": 0, "garbage_segments": 0}
    pending: deque[tuple[dict, Future[str]]] = deque()
    jobs = max(1, jobs)
    with ThreadPoolExecutor(jobs) as pool:
        for entry, audio in _recordings(groups, rng, per_recording, garbage_prob, punctuate, counts):
            pending.append((entry, pool.submit(_write_opus, out_dir / entry["path"], audio)))
            while len(pending) > 2 * jobs:
                _finish(audios, *pending.popleft())
        while pending:
            _finish(audios, *pending.popleft())
    meta = {"dataset": "GigaSpeech", "language": "EN", "version": "v1.0.0-mini",
            "description": "miniature corpus in the GigaSpeech layout, built by lmu_asr.prep.minicorpus",
            "audios": audios}
    atomic_write(out_dir / "GigaSpeech.json", json.dumps(meta, indent=1))
    return counts


def _finish(audios: list[dict], entry: dict, md5: Future[str]) -> None:
    entry["md5"] = md5.result()  # re-raises an encoding error (disk full, ...) here, in order
    audios.append(entry)


def _write_opus(path: Path, audio: np.ndarray) -> str:
    """Encode one recording under a temporary name, rename it, and return its md5 (as GigaSpeech.json lists)."""
    # compression_level 0.8: ~57 kbps, twice as fast to encode as the default (~25 kbps)
    atomic_write_with(path, lambda f: sf.write(f, audio, SAMPLE_RATE, format="OGG", subtype="OPUS",
                                               compression_level=0.8))
    return _md5(path)


def _recordings(groups: dict[tuple[str, str], list[SourceUtterance]], rng: np.random.Generator,
                per_recording: tuple[int, int], garbage_prob: float, punctuate: bool,
                counts: dict[str, int]) -> Iterator[tuple[dict, np.ndarray]]:
    """The recordings in order: each one's GigaSpeech.json entry (without md5) and its audio."""
    for (speaker, subset), utts in sorted(groups.items()):
        order = rng.permutation(len(utts))
        start = 0
        while start < len(utts):
            n = int(rng.integers(per_recording[0], per_recording[1] + 1))
            chunk = [utts[i] for i in order[start:start + n]]
            start += n
            idx = counts["recordings"]
            source, prefix = SOURCES[idx % len(SOURCES)]
            aid = f"{prefix}{idx:010d}"
            rel = Path("audio") / source / f"P{idx // 100:04d}" / f"{aid}.opus"
            pieces, segments, t = [_silence(rng, 0.3)], [], 0.3
            for k, utt in enumerate(chunk):
                if rng.random() < garbage_prob:  # a non-speech stretch labelled with a garbage tag
                    gap = _silence(rng, float(rng.uniform(0.3, 0.8)))
                    segments.append({"sid": f"{aid}_S{len(segments):07d}", "speaker": speaker,
                                     "begin_time": round(t, 2), "end_time": round(t + len(gap) / SAMPLE_RATE, 2),
                                     "text_tn": str(rng.choice(GARBAGE)), "subsets": subsets_for(subset)})
                    pieces.append(gap)
                    t += len(gap) / SAMPLE_RATE
                    counts["garbage_segments"] += 1
                x = samples_of(utt)
                x = np.concatenate([x, np.zeros((-len(x)) % (SAMPLE_RATE // 100), np.float32)])
                text = utt.text.upper()
                if punctuate and k % 3 == 2:
                    text += " <COMMA>" if rng.random() < 0.5 else " <PERIOD>"
                segments.append({"sid": f"{aid}_S{len(segments):07d}", "speaker": speaker,
                                 "begin_time": round(t, 2), "end_time": round(t + len(x) / SAMPLE_RATE, 2),
                                 "text_tn": text, "subsets": subsets_for(subset), "source_utt": utt.utt_id})
                pieces.append(x)
                t += len(x) / SAMPLE_RATE
                gap = _silence(rng, float(rng.uniform(0.2, 0.6)))
                pieces.append(gap)
                t += len(gap) / SAMPLE_RATE
            audio = np.concatenate(pieces)
            peak = float(np.abs(audio).max())
            if peak > 0.99:
                audio = audio * (0.99 / peak)
            counts["recordings"] += 1
            counts["segments"] += len(segments)
            yield ({"title": f"mini corpus recording {idx}", "url": "", "path": str(rel), "aid": aid,
                    "source": source, "channels": 1, "sample_rate": SAMPLE_RATE, "speaker": speaker,
                    "duration": round(len(audio) / SAMPLE_RATE, 4), "md5": "",
                    "subsets": subsets_for(subset), "segments": segments}, audio)
