"""``lmuasr verify``: read every byte of a shard folder once and check it against the index; or check a checkpoint.

Shards (a folder, or webdataset URLs: an uploaded copy is checked where it lives): each tar is walked header by
header, sequentially (big buffered reads, what a disk does fastest; a URL is streamed once), and every member is
checked against ``index.parquet``: header offset, data offset and size; the ``.npy`` header (float16, C order,
(num_frames, 80)); finite values; the json member's text (length as indexed, already in normal form); members
missing from the tar or present but not indexed; and at the end the per-bin mean and standard deviation of all
features against ``meta.json``'s. Counts, the first bad keys with reasons, and the read rate go to the terminal
and a JSON report; any damage means exit 1.

Checkpoint: loaded safely (``weights_only``), its config rebuilt, every tensor's name and shape compared with
the model that config builds, values checked finite, one forward pass on a second of silence.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lmu_asr.data.shards import parse_npy
from lmu_asr.data.stream import RemoteShards, open_shards, set_label, why_unreadable
from lmu_asr.prep.shards import (
    BLOCK,
    FBANK_EXT,
    FBANK_ZST_EXT,
    JSON_EXT,
    ShardError,
    decode_fbank,
    npy_bytes,
    tar_header,
)
from lmu_asr.text import normalize_transcript

MAX_EXAMPLES = 20
READ_SIZE = 1 << 24


class _Problems:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: list[dict[str, str]] = []

    def add(self, key: str, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"key": key, "reason": reason, "detail": detail})


def _members(f: io.BufferedReader) -> Any:
    """(header offset, name, size, data) of each member, read sequentially; stops at the end-of-archive block."""
    pos = 0
    while True:
        block = f.read(BLOCK)
        if len(block) < BLOCK or block == bytes(BLOCK):
            return
        head = tar_header(block)
        if head is None:
            raise ShardError(f"a damaged tar header at byte {pos}", "bad_tar_header")
        name, size = head
        data = f.read(-(-size // BLOCK) * BLOCK)
        if len(data) < size:
            raise ShardError(f"{name} is cut short at byte {pos + BLOCK + len(data)}", "truncated")
        yield pos, name, size, data[:size]
        pos += BLOCK + len(data)


def _open_shard(directory: str | Path, remote: RemoteShards | None, name: str) -> Any:
    """A shard as one sequential byte stream: the local file (None if it is not there), or its URL streamed
    through curl or the pipe command (whose failure surfaces as an OSError when the stream ends)."""
    if remote is None:
        path = Path(directory) / name
        return open(path, "rb", buffering=READ_SIZE) if path.is_file() else None
    from webdataset.gopen import gopen

    return gopen(remote.url_of(name), "rb", bufsize=READ_SIZE)


def verify_shards(directory: str | Path, progress: bool = True) -> dict[str, Any]:
    """``directory``: a shard folder, or the shards' URLs (the index is fetched; each shard is streamed once)."""
    from tqdm import tqdm

    shards, remote = open_shards(directory)
    problems = _Problems()
    total = np.zeros(80, np.float64)
    total_sq = np.zeros(80, np.float64)
    frames = ok = 0
    read_bytes = 0
    t0 = time.perf_counter()
    ext = FBANK_ZST_EXT if shards.compressed else FBANK_EXT
    bar = tqdm(total=int(np.maximum(shards.shard_sizes, 0).sum()), unit="B", unit_scale=True, desc="verify",
               disable=not progress, dynamic_ncols=True)
    for s, name in enumerate(shards.shard_names):
        rows = np.flatnonzero(shards.shard_id == s)
        by_key = {shards.key(int(i)): int(i) for i in rows}
        seen: set[str] = set()
        reported: set[str] = set()  # keys whose fbank member was already found damaged
        pending: dict[str, np.ndarray] = {}
        stream = _open_shard(directory, remote, name)
        if stream is None:
            for key in by_key:
                problems.add(key, "shard_missing", name)
            continue
        try:
            with stream as f:
                for offset, member, size, data in _members(f):
                    read_bytes += BLOCK + size
                    bar.update(BLOCK + size)
                    key, _, kind = member.partition(".")
                    i = by_key.get(key)
                    if i is None:
                        problems.add(key, "not_in_index", f"{name}: member {member}")
                        continue
                    if kind == ext:
                        if (offset, offset + BLOCK, size) != (int(shards.offset[i]), int(shards.fbank_offset[i]),
                                                               int(shards.fbank_size[i])):
                            problems.add(key, "offset_mismatch", f"{member} at {offset}, the index says "
                                         f"{int(shards.offset[i])}")
                        try:
                            pending[key] = _features(data, int(shards.num_frames[i]), key, shards.compressed)
                        except ShardError as err:
                            problems.add(key, err.reason, str(err))
                            reported.add(key)
                    elif kind == JSON_EXT:
                        seen.add(key)
                        if (offset + BLOCK, size) != (int(shards.json_offset[i]), int(shards.json_size[i])):
                            problems.add(key, "offset_mismatch", f"{member} at {offset + BLOCK}, the index says "
                                         f"{int(shards.json_offset[i])}")
                        feats = pending.pop(key, None)
                        reason = _check_text(data, int(shards.text_len[i]))
                        if reason:
                            problems.add(key, reason[0], reason[1])
                        elif feats is not None:
                            x = feats.astype(np.float32)
                            total += x.sum(0, dtype=np.float64)
                            total_sq += np.square(x).sum(0, dtype=np.float64)
                            frames += x.shape[0]
                            ok += 1
                        elif key not in reported:
                            problems.add(key, "missing_member", f"{key}.{ext} is not in {name}")
        except ShardError as err:
            problems.add(name, err.reason, str(err))
        except OSError as err:
            if remote is None:
                raise
            if isinstance(err.__context__, ShardError):  # the stream was cut off while a damaged member was read
                problems.add(name, err.__context__.reason, str(err.__context__))
            else:  # the URL could not be read (to its end): what did not come is unreadable, not missing
                why = why_unreadable(remote.url_of(name), err)
                for key in by_key.keys() - seen:
                    problems.add(key, "shard_unreadable", f"{name}: {why}")
                continue
        for key in by_key.keys() - seen:
            problems.add(key, "missing_member", f"not in {name}")
    bar.close()
    seconds = time.perf_counter() - t0
    stats = _compare_stats(shards.meta, total, total_sq, frames)
    if stats["max_mean_diff"] > 1e-3 or stats["max_std_rel_diff"] > 1e-3:
        problems.add("meta.json", "stats_mismatch", f"mean differs by {stats['max_mean_diff']:.2e}, std by "
                     f"{100 * stats['max_std_rel_diff']:.3f} %")
    return {"directory": str(directory), "label": set_label(directory, remote), "shards": len(shards.shard_names),
            "utterances": len(shards), "ok": ok, "damaged": sum(problems.counts.values()), "by_reason": dict(problems.counts),
            "examples": problems.examples, "gb_read": read_bytes / 1e9, "seconds": seconds,
            "gb_per_s": read_bytes / 1e9 / max(seconds, 1e-9), "stats": stats}


def _features(data: bytes, frames: int, key: str, compressed: bool) -> np.ndarray:
    if not compressed:
        return parse_npy(data, frames, key)
    try:
        feats = decode_fbank(data, True)
    except Exception as err:  # zstd and numpy raise their own types
        raise ShardError(f"{key}: cannot decompress ({type(err).__name__}: {err})", "bad_npy") from None
    return parse_npy(npy_bytes(feats), frames, key)


def _check_text(data: bytes, text_len: int) -> tuple[str, str] | None:
    try:
        text = json.loads(data)["text"]
    except (ValueError, KeyError, TypeError) as err:
        return "bad_json", str(err)
    if not isinstance(text, str) or len(text) != text_len:
        return "text_mismatch", f"{len(text) if isinstance(text, str) else '?'} characters, the index says {text_len}"
    if normalize_transcript(text) != text:
        return "text_not_normalised", text[:60]
    return None


def _compare_stats(meta: dict, total: np.ndarray, total_sq: np.ndarray, frames: int) -> dict[str, Any]:
    mean = total / max(frames, 1)
    std = np.sqrt(np.maximum(total_sq / max(frames, 1) - mean**2, 1e-8))
    ref_mean = np.asarray(meta["stats"]["mean"], np.float64)
    ref_std = np.asarray(meta["stats"]["std"], np.float64)
    return {"frames": int(frames), "meta_frames": int(meta["stats"].get("frames", 0)),
            "max_mean_diff": float(np.abs(mean - ref_mean).max()) if frames else 0.0,
            "max_std_rel_diff": float((np.abs(std - ref_std) / ref_std).max()) if frames else 0.0}


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Load safely, rebuild, compare every tensor, forward a second of silence; problems listed, never raised."""
    import torch

    from lmu_asr.config import config_from_dict
    from lmu_asr.model.asr import LMUASR
    from lmu_asr.train.checkpoint import load

    state = load(path)
    problems: list[str] = []
    if "model" not in state or "config" not in state:
        return {"checkpoint": str(path), "problems": ["not an lmu-asr checkpoint (no model or config)"]}
    try:
        cfg = config_from_dict(state["config"])
    except ValueError as err:
        return {"checkpoint": str(path), "problems": [f"config: {err}"]}
    model = LMUASR(cfg.model)
    expected = model.state_dict()
    got = state["model"]
    for name in sorted(expected.keys() - got.keys()):
        problems.append(f"missing tensor {name}")
    for name in sorted(got.keys() - expected.keys()):
        problems.append(f"unexpected tensor {name}")
    for name in sorted(expected.keys() & got.keys()):
        if tuple(got[name].shape) != tuple(expected[name].shape):
            problems.append(f"{name}: shape {tuple(got[name].shape)}, the config needs {tuple(expected[name].shape)}")
        elif got[name].is_floating_point() and not torch.isfinite(got[name]).all():
            problems.append(f"{name}: non-finite values")
    out_shape = None
    if not problems:
        model.load_state_dict(got)
        model.eval()
        with torch.no_grad():
            logits, lengths = model(torch.zeros(1, 100, 80), torch.tensor([100]))
        out_shape = list(logits.shape)
        if not torch.isfinite(logits).all():
            problems.append("forward pass on silence gives non-finite logits")
    modules = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    return {"checkpoint": str(path), "problems": problems, "preset": cfg.preset,
            "parameters": model.num_parameters(), "modules": modules, "output_shape_for_1s": out_shape,
            "model": {k: v for k, v in state["config"]["model"].items()},
            "step": state.get("step"), "epoch": state.get("epoch"), "best_wer": state.get("best_wer"),
            "version": state.get("version")}
