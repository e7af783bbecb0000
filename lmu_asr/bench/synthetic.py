"""Synthetic shard folders in the documented contract, without a corpus, lhotse or audio codecs.

Two kinds, both with ``index.parquet`` and ``meta.json`` exactly as prep writes them:

* ``with_data=True``: real tar shards (``ShardWriter``) of random float16 fbank and random transcripts, which the
  training loader reads like any prep output. The GPU kit uses it on machines that have no lhotse or soundfile.
* ``with_data=False``: the *shape* of a corpus only: every byte offset and size computed as the tar writer
  would lay the members out, shard files created sparse at their exact sizes (no data written). This is how
  ``lmuasr bench index`` builds a GigaSpeech-XL-sized folder (8.3 M rows, 576 shards) in a minute: opening,
  planning and worker start-up read the index and the shards' sizes, never their contents.

Everything is vectorised (numpy and Arrow buffers): building 8.3 M rows takes seconds, not a Python loop each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmu_asr.fileio import atomic_write, atomic_write_with
from lmu_asr.prep.shards import BLOCK, NPY_HEADER, ShardWriter, shard_name

LETTERS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)


def _padded(n: np.ndarray) -> np.ndarray:
    return -(-n // BLOCK) * BLOCK


def random_texts(lengths: np.ndarray, rng: np.random.Generator) -> pa.Array:
    """Upper-case transcripts of the given lengths (words of 2-8 letters), as one Arrow string array."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = LETTERS[rng.integers(0, 26, int(offsets[-1]))]
    spaces = rng.random(len(data)) < 0.18
    spaces[offsets[:-1]] = False  # no leading space
    ends = offsets[1:] - 1
    spaces[ends[ends >= 0]] = False  # no trailing space
    data[spaces] = ord(" ")
    return pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))


def _keys(n: int) -> pa.Array:
    """Keys b"SYN%09d_S0000" for i < n, built without a Python loop (millions of keys)."""
    width = 18
    digits = (np.arange(n, dtype=np.int64)[:, None] // 10 ** np.arange(8, -1, -1)) % 10 + ord("0")
    raw = np.empty((n, width), np.uint8)
    raw[:, :3] = np.frombuffer(b"SYN", np.uint8)
    raw[:, 3:12] = digits
    raw[:, 12:] = np.frombuffer(b"_S0000", np.uint8)
    offsets = np.arange(n + 1, dtype=np.int64) * width
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(raw.tobytes()))


def _meta(n: int, frames: np.ndarray, shards: list[dict], with_data: bool) -> dict:
    return {"format": "lmu-asr-shards", "format_version": 1, "synthetic": True, "with_data": with_data,
            "dtype": "float16", "members": ["fbank.npy", "json"], "compress": None,
            "stats": {"mean": [0.0] * 80, "std": [1.0] * 80, "frames": int(frames.sum())},
            "counts": {"utterances": n, "shards": len(shards), "rejected": 0, "rejected_by_reason": {}},
            "hours": round(float(frames.sum()) / 360_000, 4), "shards": shards}


def write_synthetic_shards(out: Path, utterances: int, shards: int, seed: int = 0, min_frames: int = 100,
                           max_frames: int = 1600, with_data: bool = True) -> Path:
    """A shard folder of ``utterances`` rows over ``shards`` files (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    frames = rng.integers(min_frames, max_frames + 1, utterances).astype(np.int64)
    text_len = np.maximum(1, frames // 7 + rng.integers(-3, 4, utterances))  # ~14 characters per second
    texts = random_texts(text_len, rng)
    shard_of = np.sort(rng.integers(0, shards, utterances)) if shards > 1 else np.zeros(utterances, np.int64)
    shard_of[:shards] = np.arange(min(shards, utterances))  # every shard holds at least one utterance
    shard_of.sort()
    keys = _keys(utterances)
    cols = _layout(frames, texts, shard_of, keys) if not with_data else _write_tars(out, frames, texts, shard_of,
                                                                                    keys)
    shard_names = np.array([shard_name(i) for i in range(shards)], dtype=object)
    table = pa.table({"key": keys, "shard": pa.array(shard_names[shard_of], pa.string()),
                      "position": pa.array(cols["position"]), "offset": pa.array(cols["offset"]),
                      "fbank_offset": pa.array(cols["offset"] + BLOCK), "fbank_size": pa.array(cols["fbank_size"]),
                      "json_offset": pa.array(cols["json_offset"]), "json_size": pa.array(cols["json_size"]),
                      "num_frames": pa.array(frames), "duration": pa.array(frames / 100),
                      "text_len": pa.array(text_len), "text": texts.cast(pa.string()),
                      "speaker": pa.array(np.full(utterances, "spk", dtype=object), pa.string()),
                      "recording": pa.array(np.full(utterances, "rec", dtype=object), pa.string())})
    atomic_write_with(out / "index.parquet", lambda f: pq.write_table(table, f))
    shard_info = [{"name": shard_name(i), "utterances": int((shard_of == i).sum()),
                   "frames": int(frames[shard_of == i].sum()), "bytes": int(cols["shard_bytes"][i])}
                  for i in range(shards)]
    atomic_write(out / "meta.json", json.dumps(_meta(utterances, frames, shard_info, with_data), indent=1))
    return out


def _json_sizes(frames: np.ndarray, text_len: np.ndarray) -> np.ndarray:
    """Bytes of each ``KEY.json`` member as ShardWriter writes it (sorted keys, compact separators)."""
    fixed = len(json.dumps({"duration": 0.0, "num_frames": 0, "recording": "rec", "speaker": "spk", "start": 0.0,
                            "text": ""}, sort_keys=True, separators=(",", ":")))
    digits = np.floor(np.log10(np.maximum(frames, 1))).astype(np.int64) + 1
    return fixed - 1 + digits + (digits + 1) + text_len  # num_frames digits, duration "x.yy" (approx.) + text


def _layout(frames: np.ndarray, texts: pa.Array, shard_of: np.ndarray, keys: pa.Array) -> dict:
    """Offsets as ShardWriter would write them, computed (no bytes written); sparse shard files sized to match."""
    text_len = np.diff(np.frombuffer(texts.buffers()[1], np.int64)[: len(frames) + 1])
    fbank_size = NPY_HEADER + frames * 160
    json_size = _json_sizes(frames, text_len)
    sample = 2 * BLOCK + _padded(fbank_size) + _padded(json_size)
    position = np.zeros(len(frames), np.int64)
    offset = np.zeros(len(frames), np.int64)
    starts = np.flatnonzero(np.r_[True, shard_of[1:] != shard_of[:-1]])
    ends = np.r_[starts[1:], len(frames)]
    shard_bytes = np.zeros(int(shard_of.max()) + 1 if len(shard_of) else 0, np.int64)
    for a, b in zip(starts, ends, strict=True):  # per shard (hundreds), vectorised within
        position[a:b] = np.arange(b - a)
        csum = np.cumsum(sample[a:b])
        offset[a:b] = csum - sample[a:b]
        shard_bytes[shard_of[a]] = -(-(int(csum[-1]) + 2 * BLOCK) // 10240) * 10240  # end blocks, record size
    json_offset = offset + BLOCK + _padded(fbank_size) + BLOCK
    return {"position": position, "offset": offset, "fbank_size": fbank_size, "json_offset": json_offset,
            "json_size": json_size, "shard_bytes": shard_bytes}


def make_sparse_files(out: Path) -> None:
    """Create every shard of a ``with_data=False`` folder as a sparse file of its recorded size."""
    for shard in json.loads((out / "meta.json").read_text())["shards"]:
        with open(out / shard["name"], "wb") as f:
            f.truncate(shard["bytes"])


def _write_tars(out: Path, frames: np.ndarray, texts: pa.Array, shard_of: np.ndarray, keys: pa.Array) -> dict:
    rng = np.random.default_rng(1)
    cols = {k: np.zeros(len(frames), np.int64) for k in ("position", "offset", "fbank_size", "json_offset",
                                                         "json_size")}
    shard_bytes = np.zeros(int(shard_of.max()) + 1, np.int64)
    text_list, key_list = texts.to_pylist(), keys.to_pylist()
    for s in range(len(shard_bytes)):
        writer = ShardWriter(out / shard_name(s))
        for pos, i in enumerate(np.flatnonzero(shard_of == s)):
            x = rng.standard_normal((int(frames[i]), 80)).astype(np.float16)
            meta = {"text": text_list[i], "duration": round(int(frames[i]) / 100, 2), "num_frames": int(frames[i]),
                    "speaker": "spk", "recording": "rec", "start": 0.0}
            spans = writer.add(key_list[i], x, meta)
            cols["position"][i] = pos
            for k in ("offset", "fbank_size", "json_offset", "json_size"):
                cols[k][i] = spans[k]
        shard_bytes[s] = writer.close()
    return {**cols, "shard_bytes": shard_bytes}


def write_synthetic_gigaspeech(out: Path, segments: int, per_recording: int = 100, seed: int = 0) -> Path:
    """A ``GigaSpeech.json`` of ``segments`` segments in XL's shape (every segment in {XL}), and no audio.

    Enough for everything prep does before decoding (validation, lhotse's recipe, planning): ``lmuasr prep
    --plan-only`` and ``lmuasr bench prep-plan`` measure prep's bookkeeping at GigaSpeech scale with it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    durations = rng.uniform(1.0, 8.0, segments).round(2)
    texts = random_texts(np.maximum(1, (durations * 14).astype(np.int64)), rng).to_pylist()

    def audios():  # noqa: ANN202 (a generator of JSON text pieces, so 8 M segments never sit in one string)
        for r, start in enumerate(range(0, segments, per_recording)):
            aid = f"POD{r:010d}"
            t, segs = 0.5, []
            for k in range(start, min(segments, start + per_recording)):
                segs.append({"sid": f"{aid}_S{k - start:07d}", "speaker": "N/A", "begin_time": round(t, 2),
                             "end_time": round(t + durations[k], 2), "text_tn": texts[k], "subsets": ["{XL}"]})
                t += durations[k] + 0.3
            yield json.dumps({"title": "", "url": "", "path": f"audio/podcast/P{r // 100:04d}/{aid}.opus",
                              "aid": aid, "source": "podcast", "channels": 1, "sample_rate": 16000,
                              "speaker": "N/A", "duration": round(t + 0.5, 2), "md5": "", "subsets": ["{XL}"],
                              "segments": segs})

    def write(f) -> None:  # noqa: ANN001
        f.write(b'{"dataset": "GigaSpeech", "version": "synthetic", "audios": [\n')
        for i, piece in enumerate(audios()):
            f.write((",\n" if i else "").encode() + piece.encode())
        f.write(b"\n]}\n")

    atomic_write_with(out / "GigaSpeech.json", write)
    return out
