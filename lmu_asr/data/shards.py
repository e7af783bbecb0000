"""Random access to prep's shards through ``index.parquet``: one ``pread`` per utterance, no tar parsing.

The loader plans every epoch from the index alone (lengths, shard order), then reads each utterance's two adjacent
members (``KEY.fbank.npy`` + ``KEY.json``) with a single read at the offsets prep recorded. The ``.npy`` header is
checked, not parsed: the index already knows the shape, so decoding is one ``np.frombuffer``.

Damage is contained: a shard that is shorter than its index says (truncated copy) is excluded when the set is
opened (warning + count); a sample whose bytes do not decode is skipped when read (counted by the caller).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmu_asr import UserError
from lmu_asr.prep.shards import ShardError, decode_fbank

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"


def label_stats(text: str) -> tuple[int, int]:
    """(labels, adjacent repeats): CTC needs at least labels + repeats output frames for a transcript."""
    return len(text), sum(1 for a, b in zip(text, text[1:], strict=False) if a == b)


@dataclass
class ShardSet:
    """An opened shard directory: per-utterance arrays from the index plus lazily opened file handles."""

    directory: Path
    meta: dict
    shard_names: list[str]
    shard_id: np.ndarray  # int32 per utterance
    position: np.ndarray
    fbank_offset: np.ndarray
    fbank_size: np.ndarray
    json_offset: np.ndarray
    json_size: np.ndarray
    num_frames: np.ndarray
    min_out_frames: np.ndarray  # labels + repeats: the CTC feasibility bound
    keys: list[str]
    texts: list[str]
    damaged_shards: list[str] = field(default_factory=list)
    _files: dict[int, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | Path) -> ShardSet:
        import pyarrow.parquet as pq

        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"shard directory not found: {directory}")
        index, meta_path = directory / "index.parquet", directory / "meta.json"
        if not index.is_file() or not meta_path.is_file():
            raise UserError(f"{directory} is not a prep output (no index.parquet / meta.json); run lmuasr prep")
        meta = json.loads(meta_path.read_text())
        cols = ["key", "shard", "position", "fbank_offset", "fbank_size", "json_offset", "json_size", "num_frames",
                "text"]
        table = pq.read_table(index, columns=cols).to_pydict()
        names = sorted(set(table["shard"]))
        name_to_id = {n: i for i, n in enumerate(names)}
        shard_id = np.array([name_to_id[s] for s in table["shard"]], dtype=np.int32)
        json_end = np.asarray(table["json_offset"], np.int64) + np.asarray(table["json_size"], np.int64)
        damaged = []
        for i, name in enumerate(names):
            path = directory / name
            need = int(json_end[shard_id == i].max())
            size = path.stat().st_size if path.is_file() else -1
            if size < need:
                damaged.append(name)
                log.warning("shard %s is %s (index needs %d bytes); its utterances are skipped", name,
                            "missing" if size < 0 else f"truncated at {size} bytes", need)
        stats = [label_stats(t) for t in table["text"]]
        return cls(directory, meta, names, shard_id, np.asarray(table["position"], np.int64),
                   np.asarray(table["fbank_offset"], np.int64), np.asarray(table["fbank_size"], np.int64),
                   np.asarray(table["json_offset"], np.int64), np.asarray(table["json_size"], np.int64),
                   np.asarray(table["num_frames"], np.int64), np.array([a + b for a, b in stats], np.int64),
                   table["key"], table["text"], damaged)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def compressed(self) -> bool:
        return self.meta.get("compress") == "zstd"

    @property
    def usable(self) -> np.ndarray:
        """Boolean mask of utterances in undamaged shards."""
        bad = [i for i, n in enumerate(self.shard_names) if n in self.damaged_shards]
        return ~np.isin(self.shard_id, bad)

    def stats(self) -> tuple[list[float], list[float]]:
        s = self.meta["stats"]
        return s["mean"], s["std"]

    def _file(self, shard: int):  # noqa: ANN202 (binary file)
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.directory / self.shard_names[shard], "rb", buffering=0)
        return f

    def read(self, i: int) -> tuple[np.ndarray, str]:
        """Features (frames, 80) float16 and transcript of utterance ``i``; raises ShardError if damaged."""
        start, size = int(self.fbank_offset[i]), int(self.fbank_size[i])
        end = int(self.json_offset[i] + self.json_size[i])
        try:
            blob = os.pread(self._file(int(self.shard_id[i])).fileno(), end - start, start)
        except OSError as err:
            raise ShardError(f"{self.keys[i]}: {err}") from None
        if len(blob) != end - start:
            raise ShardError(f"{self.keys[i]}: shard is truncated")
        n = int(self.num_frames[i])
        try:
            if self.compressed:
                feats = decode_fbank(blob[:size], compressed=True)
            else:
                if blob[:6] != NPY_MAGIC:
                    raise ValueError("not an .npy member")
                header = 10 + int.from_bytes(blob[8:10], "little")
                if size != header + n * 160:
                    raise ValueError(f"member holds {size} bytes, expected {header + n * 160}")
                feats = np.frombuffer(blob, dtype="<f2", count=n * 80, offset=header).reshape(n, 80)
            text = json.loads(blob[int(self.json_offset[i]) - start:])["text"]
        except (ValueError, KeyError, UnicodeDecodeError) as err:
            raise ShardError(f"{self.keys[i]}: corrupt sample ({err})") from None
        if feats.shape != (n, 80):
            raise ShardError(f"{self.keys[i]}: shape {feats.shape} does not match the index")
        return feats, text

    def close(self) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # file handles are per process (DataLoader workers open their own)
        return state
