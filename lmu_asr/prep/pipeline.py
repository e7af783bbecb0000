"""``lmuasr prep``: corpus -> features -> shards, restartable, parallel, honest about bad input.

Work is done one *group* (a few shards) at a time. A group is finished when its shards have been renamed into place
and then its marker ``OUT/.prep/groups/group-NNNNNN.json`` (index rows, rejections, statistics) has been written;
a restarted run with the same command recomputes the same plan and skips finished groups, and the shards it does
write are byte-identical to an uninterrupted run's (tests kill a run with SIGKILL to check it). The final
``index.parquet``, ``rejected.jsonl`` and ``meta.json`` are assembled from the markers, each written atomically.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from lmu_asr import UserError, __version__
from lmu_asr.fileio import atomic_write as _atomic_write
from lmu_asr.fileio import atomic_write_with, check_writable
from lmu_asr.prep.corpus import (
    check_gigaspeech_dir,
    file_sha256,
    load_cutset,
    load_gigaspeech,
    validate_gigaspeech_json,
)
from lmu_asr.prep.features import FeatureConfig
from lmu_asr.prep.plan import Group, plan_groups, recordings_from_cuts
from lmu_asr.prep.shards import ShardWriter, shard_name
from lmu_asr.prep.worker import RecordingResult, featurize_recording, init_worker

log = logging.getLogger(__name__)

FORMAT = "lmu-asr-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_FRAMES = 6_250_000  # x 80 x 2 bytes (float16) = 1.0 GB per shard, ~17 hours of audio


@dataclass
class PrepOptions:
    out: Path
    corpus_dir: Path | None = None
    subset: str | None = None
    cuts: Path | None = None
    jobs: int = 1
    shard_frames: int = DEFAULT_SHARD_FRAMES
    shuffle_group: int = 4
    seed: int = 0
    compress: str | None = None
    progress: bool = True
    command: str = ""
    source_sha256: str | None = None  # content of GigaSpeech.json / the cuts manifest (set by run_prep)
    plan_only: bool = False  # stop after planning: counts and timings, no audio decoded, no shard written

    def fingerprint(self) -> dict:
        """What determines the output bytes; a different fingerprint in an existing --out is refused."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "corpus_dir": str(self.corpus_dir.resolve()) if self.corpus_dir else None,
                "subset": self.subset.upper() if self.subset else None,
                "cuts": str(self.cuts.resolve()) if self.cuts else None, "shard_frames": self.shard_frames,
                "shuffle_group": self.shuffle_group, "seed": self.seed, "compress": self.compress,
                "features": FeatureConfig().to_dict(), "source_sha256": self.source_sha256}


def _check_out_dir(opts: PrepOptions) -> Path:
    out, state = opts.out, opts.out / ".prep"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    config_file = state / "config.json"
    if out.is_dir() and any(out.iterdir()):
        if not config_file.is_file():
            raise UserError(f"--out {out} exists, is not empty and is not an lmu-asr prep output; "
                            "choose a new directory")
        try:
            old = json.loads(config_file.read_text())
        except ValueError:
            old = {}
        new = opts.fingerprint()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff == ["source_sha256"]:
            raise UserError(f"--out {out} was made from other input: the content of "
                            f"{'the cuts manifest' if opts.cuts else 'GigaSpeech.json'} has changed since; output "
                            "made from other input is never reused: use a new --out (or delete this one)")
        if diff:
            raise UserError(f"--out {out} holds shards from a different configuration (differs in: "
                            f"{', '.join(diff)}); use a new --out or the original options")
    (state / "groups").mkdir(parents=True, exist_ok=True)
    if not config_file.is_file():
        _atomic_write(config_file, json.dumps(opts.fingerprint(), indent=1))
    for stale in list(out.glob("*.tmp")) + list((state / "groups").glob("*.tmp")):
        stale.unlink()  # left by a killed run; the group that wrote it is redone
    return state


def _marker(state: Path, group: Group) -> Path:
    return state / "groups" / f"group-{group.index:06d}.json"


def _rows_file(state: Path, index: int) -> Path:
    """A finished group's index rows, columnar: finalising reads these, never millions of JSON objects."""
    return state / "groups" / f"group-{index:06d}.parquet"


# index.parquet's columns (the contract in the README), typed once so every group's table concatenates
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("position", pa.int64()), ("offset", pa.int64()),
    ("fbank_offset", pa.int64()), ("fbank_size", pa.int64()), ("json_offset", pa.int64()),
    ("json_size", pa.int64()), ("num_frames", pa.int64()), ("duration", pa.float64()), ("text_len", pa.int64()),
    ("text", pa.string()), ("speaker", pa.string()), ("recording", pa.string())])


def _audio_stats(group: Group) -> dict[str, list[int]]:
    """(size, mtime) of each local audio file of a group: a group whose audio changed since is redone."""
    out = {}
    for job in group.recordings:
        if job.path is not None:
            try:
                st = os.stat(job.path)
                out[job.recording_id] = [st.st_size, st.st_mtime_ns]
            except OSError:
                out[job.recording_id] = [-1, 0]
    return out


def _group_done(out: Path, state: Path, group: Group) -> dict | None:
    marker = _marker(state, group)
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except ValueError:
        return None
    if done.get("audio") != _audio_stats(group):
        log.info("the audio of group %d changed since its shards were written; redoing it", group.index)
        return None
    if "rows" not in done and not _rows_file(state, group.index).is_file():
        return None
    for shard in done["shards"]:
        path = out / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            return None  # a shard went missing or was damaged after the marker was written: redo the group
    return done


def _write_group(out: Path, group: Group, results: list[RecordingResult], compress: str | None) -> dict:
    """Write the group's shards from its features (in the planned order) and return its marker content."""
    feats = {k: v for r in results for k, v in r.features.items()}
    segments = {s.key: s for job in group.recordings for s in job.segments}
    per_shard: dict[int, list[tuple[int, str]]] = {}
    for key, (shard, pos) in group.assignment.items():
        per_shard.setdefault(shard, []).append((pos, key))
    total = np.zeros(80, np.float64)
    total_sq = np.zeros(80, np.float64)
    frames, rows, shards = 0, [], []
    for shard in range(group.first_shard, group.first_shard + group.num_shards):
        name = shard_name(shard)
        writer = ShardWriter(out / name, compress)
        count = shard_frames = 0
        try:
            for _, key in sorted(per_shard.get(shard, [])):
                if key not in feats:
                    continue  # rejected while decoding; the reason is in the results
                seg, x = segments[key], feats[key]
                meta = {"text": seg.text, "duration": round(x.shape[0] / 100, 2), "num_frames": int(x.shape[0]),
                        "speaker": seg.speaker, "recording": seg.recording_id, "start": round(seg.start, 3)}
                spans = writer.add(key, x, meta)
                rows.append({"key": key, "shard": name, "position": count, **spans,
                             "num_frames": int(x.shape[0]), "duration": meta["duration"],
                             "text_len": len(seg.text), "text": seg.text, "speaker": seg.speaker,
                             "recording": seg.recording_id})
                x64 = x.astype(np.float64)
                total += x64.sum(0)
                total_sq += np.square(x64).sum(0)
                frames += x.shape[0]
                count += 1
                shard_frames += x.shape[0]
            size = writer.close()
        except BaseException:
            writer.abort()
            raise
        shards.append({"name": name, "utterances": count, "frames": shard_frames, "bytes": size})
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    atomic_write_with(_rows_file(out / ".prep", group.index), lambda f: pq.write_table(table, f))
    return {"group": group.index, "shards": shards, "utterances": len(rows), "audio": _audio_stats(group),
            "rejected": [r for res in results for r in res.rejected],
            "stats": {"sum": total.tolist(), "sum_sq": total_sq.tolist(), "frames": frames},
            "decoded_seconds": sum(r.decoded_seconds for r in results),
            "decoded_rates": dict(Counter(str(r.decoded_rate) for r in results if r.decoded_rate))}


def _results(group: Group, pool) -> Iterator[RecordingResult]:  # noqa: ANN001 (multiprocessing Pool | None)
    if pool is None:
        yield from map(featurize_recording, group.recordings)
    else:
        yield from pool.imap(featurize_recording, group.recordings, chunksize=1)


def _load_cuts(opts: PrepOptions, state: Path) -> tuple[object, list[dict], set[str], list[str], dict]:
    if opts.cuts is not None:
        return load_cutset(opts.cuts), [], set(), [], {"cuts": str(opts.cuts)}
    assert opts.corpus_dir is not None and opts.subset is not None
    subset = check_gigaspeech_dir(opts.corpus_dir, opts.subset)
    cuts, rejected, drop, notes = load_gigaspeech(opts.corpus_dir, subset, state / "manifests", max(opts.jobs, 1))
    return cuts, rejected, drop, notes, {"corpus_dir": str(opts.corpus_dir), "subset": subset}


def validate_options(opts: PrepOptions) -> None:
    if (opts.cuts is None) == (opts.corpus_dir is None):
        raise UserError("give either --corpus-dir (with --subset) or --cuts")
    if opts.corpus_dir is not None:
        if opts.subset is None:
            raise UserError("--corpus-dir needs --subset (xs, s, m, l, xl, dev or test)")
        opts.subset = check_gigaspeech_dir(opts.corpus_dir, opts.subset)
    if opts.jobs < 1 or opts.shard_frames < 1000 or opts.shuffle_group < 1:
        raise UserError("--jobs and --shuffle-group must be >= 1 and --shard-frames >= 1000")
    if opts.compress not in (None, "zstd"):
        raise UserError(f"unknown --compress {opts.compress!r} (zstd or none)")


def source_digest(opts: PrepOptions) -> str:
    """sha256 of the input's description (GigaSpeech.json fully parsed and checked first; or the cuts file)."""
    if opts.cuts is not None:
        if not opts.cuts.is_file():
            raise UserError(f"cuts manifest not found: {opts.cuts}")
        return file_sha256(opts.cuts)
    assert opts.corpus_dir is not None
    return str(validate_gigaspeech_json(opts.corpus_dir)["sha256"])


def run_prep(opts: PrepOptions) -> dict:
    """Run (or resume) prep; returns the meta.json content.

    Order matters for what a failure leaves behind: the input is validated (and hashed) before anything is
    written, the output folder is probed for writability before the hour of work, and every file is written
    under a temporary name.
    """
    validate_options(opts)
    t0 = time.time()
    timings: dict[str, float] = {}
    opts.source_sha256 = source_digest(opts)
    timings["validate_input_s"] = time.time() - t0
    check_writable(opts.out, "--out")
    state = _check_out_dir(opts)
    t = time.time()
    cuts, rejected, drop, notes, source = _load_cuts(opts, state)
    timings["lhotse_manifests_s"] = time.time() - t
    t = time.time()
    try:
        jobs, plan_rejects = recordings_from_cuts(cuts, skip=drop)
    except UserError:
        raise
    except Exception as err:  # lhotse reads lazily: a damaged manifest fails here, not when it is opened
        raise UserError(f"cannot read the cuts of {opts.cuts or opts.corpus_dir}: {type(err).__name__}: "
                        f"{str(err).strip()[:120]}") from None
    rejected = rejected + plan_rejects
    if not jobs:
        raise UserError(f"no usable utterances found ({len(rejected)} rejected; see the reasons with --log-level "
                        "DEBUG)" if rejected else "no utterances found in the input")
    timings["read_cuts_s"] = time.time() - t
    t = time.time()
    groups = plan_groups(jobs, opts.shard_frames, opts.shuffle_group, opts.seed)
    timings["plan_groups_s"] = time.time() - t
    hours = {g.index: sum(j.frames for j in g.recordings) / 360_000 for g in groups}
    if opts.plan_only:
        return {"plan_only": True, "recordings": len(jobs), "segments": sum(len(j.segments) for j in jobs),
                "rejected": len(rejected), "groups": len(groups), "shards": sum(g.num_shards for g in groups),
                "hours": round(sum(hours.values()), 3), "timings": timings, "groups_planned": groups}
    markers: dict[int, dict] = {}
    for g in groups:
        done = _group_done(opts.out, state, g)
        if done is not None:
            markers[g.index] = done
    resumed = len(markers)
    bar = tqdm(total=sum(hours.values()), initial=sum(hours[i] for i in markers), unit="h",
               desc="prep", disable=not opts.progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} audio-h [{elapsed}<{remaining}{postfix}]")
    pool = None
    if opts.jobs > 1 and len(groups) > len(markers):
        pool = mp.get_context("spawn").Pool(opts.jobs, initializer=init_worker)
    done_utts, done_hours, work_t0 = 0, 0.0, time.time()
    try:
        for g in groups:
            if g.index in markers:
                continue
            results = []
            rec_hours = {j.recording_id: j.frames / 360_000 for j in g.recordings}
            for res in _results(g, pool):
                results.append(res)
                bar.update(rec_hours[res.recording_id])
                done_utts += len(res.features)
                done_hours += rec_hours[res.recording_id]
                elapsed = max(time.time() - work_t0, 1e-9)
                bar.set_postfix_str(f"{done_hours / elapsed:.4f} audio-h/s, {done_utts / elapsed:.0f} utt/s")
            marker = _write_group(opts.out, g, results, opts.compress)
            _atomic_write(_marker(state, g), json.dumps(marker))
            markers[g.index] = marker
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    meta = _finalize(opts, groups, markers, rejected, notes, source, time.time() - t0, resumed)
    return meta


def _finalize(opts: PrepOptions, groups: list[Group], markers: dict[int, dict], rejected: list[dict],
              notes: list[str], source: dict, seconds: float, resumed: int) -> dict:
    import lhotse

    rejected = rejected + [r for g in groups for r in markers[g.index]["rejected"]]
    shards = [s for g in groups for s in markers[g.index]["shards"]]
    total = np.sum([markers[g.index]["stats"]["sum"] for g in groups], axis=0)
    total_sq = np.sum([markers[g.index]["stats"]["sum_sq"] for g in groups], axis=0)
    frames = sum(markers[g.index]["stats"]["frames"] for g in groups)
    mean = total / max(frames, 1)
    std = np.sqrt(np.maximum(total_sq / max(frames, 1) - mean**2, 1e-8))
    rates: Counter[str] = Counter()
    for g in groups:
        rates.update(markers[g.index].get("decoded_rates", {}))
    out = opts.out

    def write_index(f: IO[bytes]) -> None:  # one row group per prep group: memory is one group's rows
        with pq.ParquetWriter(f, INDEX_SCHEMA) as writer:
            for g in groups:
                m = markers[g.index]
                rows = pa.Table.from_pylist(m["rows"], schema=INDEX_SCHEMA) if "rows" in m else \
                    pq.read_table(_rows_file(out / ".prep", g.index), schema=INDEX_SCHEMA)
                writer.write_table(rows)

    atomic_write_with(out / "index.parquet", write_index)
    utterances = sum(m.get("utterances", len(m.get("rows", []))) for m in markers.values())
    _atomic_write(out / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected))
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lmu_asr_version": __version__,
        "lhotse_version": lhotse.__version__, "command": opts.command or " ".join(sys.argv),
        "source": source, "features": FeatureConfig().to_dict(), "dtype": "float16",
        "members": ["fbank.npy.zst" if opts.compress else "fbank.npy", "json"], "compress": opts.compress,
        "seed": opts.seed, "shard_frames": opts.shard_frames, "shuffle_group": opts.shuffle_group,
        "stats": {"mean": mean.tolist(), "std": std.tolist(), "frames": int(frames)},
        "counts": {"utterances": utterances, "shards": len(shards), "rejected": len(rejected),
                   "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
                   "recordings": sum(len(g.recordings) for g in groups)},
        "hours": round(frames / 360_000, 4),
        "decoded_sample_rates": dict(rates), "notes": notes,
        "dali_index": "shard-NNNNNN.idx beside each tar (DALI wds2idx format v1.2)",
        "shards": shards, "seconds": round(seconds, 2), "resumed_groups": resumed,
    }
    _atomic_write(out / "meta.json", json.dumps(meta, indent=1))
    from lmu_asr.data.index import load_index

    load_index(out, rebuild=True)  # the memory-mapped cache every rank opens (a reader would build it anyway)
    return meta


def summary_lines(meta: dict) -> list[str]:
    c = meta["counts"]
    lines = [f"wrote {c['utterances']} utterances ({meta['hours']:.2f} h) in {c['shards']} shard(s) to "
             f"{meta.get('out', '')}".rstrip(),
             f"rejected {c['rejected']}" + (": " + ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items())
                                           if c["rejected"] else "") + " (details in rejected.jsonl)"]
    if meta.get("resumed_groups"):
        lines.append(f"resumed: {meta['resumed_groups']} group(s) were already complete")
    rates = {k: v for k, v in meta.get("decoded_sample_rates", {}).items() if k != "16000"}
    if rates:
        lines.append("resampled to 16 kHz: " + ", ".join(f"{v} recording(s) decoded at {k} Hz"
                                                          for k, v in rates.items()))
    lines.extend(meta.get("notes", []))
    lines.append(f"took {meta['seconds']:.1f} s")
    return lines


