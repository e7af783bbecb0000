"""Random access to prep's shards through the index: one ``pread`` per utterance, every byte checked before use.

The loader plans every epoch from the index alone (lengths, shard order; see ``lmu_asr.data.index`` for how it is
memory-mapped and shared), then reads each utterance's two adjacent members (``KEY.fbank.npy`` + ``KEY.json``)
with a single read from the fbank member's tar header to the end of the json member.

Damage is contained to the sample, never the shard, and never silent:

* at open (from the shards' sizes alone, vectorised): utterances of a missing shard, or lying past the end of a
  truncated one, are marked unusable with their reason; the rest of that shard is still used;
* at read: both tar headers must name ``KEY`` with the sizes the index gives (checksums verified); the ``.npy``
  header must say float16, C order, shape (num_frames, 80); the features must be finite; the json must hold the
  text the index measured. When the headers do not match (a member was removed or resized, so the index's offsets
  are stale), the shard's members are located by scanning its tar headers once, and the utterance is read from
  where it really is. Anything else raises :class:`ShardError` with a reason code, which callers count per key.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lmu_asr import UserError
from lmu_asr.prep.shards import (
    BLOCK,
    FBANK_EXT,
    FBANK_ZST_EXT,
    JSON_EXT,
    ShardError,
    scan_members,
    tar_header,
)

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
# damage found at open time, per utterance (0: none)
OPEN_DAMAGE = {1: "shard_missing", 2: "past_end_of_truncated_shard", 3: "missing_member"}


def label_stats(text: str) -> tuple[int, int]:
    """(labels, adjacent repeats): CTC needs at least labels + repeats output frames for a transcript."""
    return len(text), sum(1 for a, b in zip(text, text[1:], strict=False) if a == b)


def check_finite(feats: np.ndarray, key: str) -> np.ndarray:
    """Reject inf/NaN features: float16 with all exponent bits set (an integer test: float16 ufuncs are slow)."""
    if feats.size and int((feats.view(np.uint16) & 0x7C00).max()) == 0x7C00:
        raise ShardError(f"{key}: features hold non-finite values", "non_finite")
    return feats


@lru_cache(maxsize=4096)
def expected_npy_header(frames: int) -> bytes:
    """The header np.save writes for a (frames, 80) float16 array: what prep's members start with."""
    fp = io.BytesIO()
    np.lib.format.write_array_header_1_0(fp, {"descr": "<f2", "fortran_order": False, "shape": (frames, 80)})
    return fp.getvalue()


def parse_npy(payload: bytes, frames: int, key: str) -> np.ndarray:
    """The (frames, 80) float16 array of an ``.npy`` member, after checking its header against the index.

    Fast path: the header is byte-identical to the one prep writes for this shape. Otherwise (an array written by
    another tool) the header is parsed with numpy's literal parser and checked field by field.
    """
    expected = expected_npy_header(frames)
    if payload[:len(expected)] == expected and len(payload) == len(expected) + frames * 160:
        feats = np.frombuffer(payload, dtype="<f2", count=frames * 80, offset=len(expected)).reshape(frames, 80)
        return check_finite(feats, key)
    if payload[:6] != NPY_MAGIC:
        raise ShardError(f"{key}: the fbank member is not an .npy array", "bad_npy")
    try:
        fp = io.BytesIO(payload)
        version = np.lib.format.read_magic(fp)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fp)  # a safe literal parser, never pickle
    except (ValueError, SyntaxError) as err:
        raise ShardError(f"{key}: unreadable .npy header ({err})", "bad_npy") from None
    if dtype != np.dtype("<f2") or fortran or shape != (frames, 80):
        raise ShardError(f"{key}: .npy holds {dtype} {'F' if fortran else 'C'}-order {shape}, the index says "
                         f"float16 ({frames}, 80)", "shape_mismatch")
    start = fp.tell()
    if len(payload) - start != frames * 160:
        raise ShardError(f"{key}: .npy data is {len(payload) - start} bytes, expected {frames * 160}", "bad_npy")
    return check_finite(np.frombuffer(payload, dtype="<f2", count=frames * 80, offset=start).reshape(frames, 80),
                        key)


@dataclass
class ShardSet:
    """An opened shard directory: memory-mapped per-utterance columns plus lazily opened file handles."""

    directory: Path
    meta: dict
    shard_names: list[str]
    shard_sizes: np.ndarray  # bytes per shard at open (-1: missing)
    shard_id: np.ndarray
    position: np.ndarray
    offset: np.ndarray  # tar header of the fbank member
    fbank_offset: np.ndarray
    fbank_size: np.ndarray
    json_offset: np.ndarray
    json_size: np.ndarray
    num_frames: np.ndarray
    min_out_frames: np.ndarray  # labels + repeats: the CTC feasibility bound
    text_len: np.ndarray
    keys_array: Any  # pyarrow string array (memory-mapped)
    damage: np.ndarray  # uint8 per utterance, OPEN_DAMAGE codes
    cache_path: Path | None = None
    _files: dict[int, int] = field(default_factory=dict, repr=False)
    _members: dict[int, tuple[dict[str, tuple[int, int]], bool]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | Path, rebuild_cache: bool = False,
             shard_sizes: dict[str, int] | None = None) -> ShardSet:
        """Open a shard folder; ``shard_sizes`` (name -> bytes) stands in for the files' sizes when the shards are
        not local (``lmu_asr.data.stream``: the folder then holds only the fetched index and meta.json)."""
        from lmu_asr.data.index import load_index

        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"shard directory not found: {directory}")
        index, meta_path = directory / "index.parquet", directory / "meta.json"
        if not index.is_file() or not meta_path.is_file():
            raise UserError(f"{directory} is not a prep output (no index.parquet / meta.json); run lmuasr prep")
        try:
            meta = json.loads(meta_path.read_text())
            meta["stats"]["mean"], meta["stats"]["std"]  # noqa: B018 (presence check)
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{meta_path} is damaged ({type(err).__name__}: {err}); rerun lmuasr prep") from None
        table, cache = load_index(directory, rebuild=rebuild_cache)
        sizes = None
        if shard_sizes is not None:
            names = json.loads(table.schema.metadata[b"shard_names"])
            sizes = np.array([shard_sizes.get(n, -1) for n in names], np.int64)
        return _from_table(directory, meta, table, cache, sizes)

    @classmethod
    def from_arrays(cls, directory: Path, meta: dict, shard_names: list[str], *,
                    shard_sizes: np.ndarray | None = None, **cols: Any) -> ShardSet:
        """A set from index columns; the shards' sizes are read (stat only) unless given."""
        if shard_sizes is None:
            shard_sizes = np.array([_size(directory / n) for n in shard_names], np.int64)
        n = len(cols["num_frames"])
        for name in ("offset", "fbank_offset", "fbank_size", "json_offset", "json_size", "text_len",
                     "min_out_frames"):
            cols.setdefault(name, np.zeros(n, np.int64))
        cols.setdefault("keys_array", None)
        damage = np.zeros(n, np.uint8)
        if n and len(shard_names):
            have = shard_sizes[cols["shard_id"]]
            end = cols["json_offset"].astype(np.int64) + cols["json_size"]
            damage[have < end] = 2
            damage[have < 0] = 1
        out = cls(directory, meta, list(shard_names), shard_sizes, damage=damage, **cols)
        for shard in np.unique(cols["shard_id"][damage == 2]) if n else []:
            if (directory / shard_names[int(shard)]).is_file():  # local shards only (not a streamed set)
                out._locate_survivors(int(shard))
        return out

    def _locate_survivors(self, shard: int) -> None:
        """A shard shorter than its index says: find which of its utterances are still in it, by name.

        A member removed from the middle (``tar --delete``) also shortens the file and shifts everything after
        it; those utterances are still there and are read from where they are. Only the ones not found are lost:
        ``past_end_of_truncated_shard`` when the archive is cut short, ``missing_member`` when it ends properly.
        """
        rows = np.flatnonzero(self.shard_id == shard)
        fd = self._fd(shard)
        members, complete = self._members[shard] = scan_members(fd, int(self.shard_sizes[shard]))
        ext = FBANK_ZST_EXT if self.compressed else FBANK_EXT
        for i in rows:
            key = self.key(int(i))
            found = f"{key}.{ext}" in members and f"{key}.{JSON_EXT}" in members
            self.damage[i] = 0 if found else (3 if complete else 2)
        lost = int((self.damage[rows] > 0).sum())
        log.warning("shard %s is %s (%d bytes shorter than its index says): %d of its %d utterances are %s and "
                    "skipped; the others are read where they are", self.shard_names[shard],
                    "complete but rewritten" if complete else "truncated",
                    int(self.json_offset[rows].max() + self.json_size[rows].max() - self.shard_sizes[shard]),
                    lost, len(rows), "missing" if complete else "past its end")

    def __len__(self) -> int:
        return len(self.num_frames)

    def key_list(self) -> list[str]:
        """Every key as a Python list (small sets, tests and reports only: 8 M strings cost gigabytes)."""
        return [str(k) for k in self.keys_array.to_pylist()] if self.keys_array is not None else \
            [str(i) for i in range(len(self))]

    def key(self, i: int) -> str:
        return str(self.keys_array[i].as_py()) if self.keys_array is not None else str(i)

    def speakers(self) -> dict[str, str]:
        """Key -> speaker, read from index.parquet on demand (evaluation reports only: training never needs it,
        so the memory-mapped index does not carry it). Empty if the index names no speakers."""
        import pyarrow.parquet as pq

        index = self.directory / "index.parquet"
        if not index.is_file() or "speaker" not in pq.read_schema(index).names:
            return {}
        table = pq.read_table(index, columns=["key", "speaker"]).to_pydict()
        return {k: s for k, s in zip(table["key"], table["speaker"], strict=True) if s}

    @property
    def compressed(self) -> bool:
        return self.meta.get("compress") == "zstd"

    @property
    def usable(self) -> np.ndarray:
        """Boolean mask of utterances not found damaged at open."""
        return self.damage == 0

    @property
    def damaged_shards(self) -> list[str]:
        """Shards with any utterance damaged at open (readers that take whole shards, like DALI, skip them)."""
        ids = np.unique(self.shard_id[self.damage > 0])
        return [self.shard_names[i] for i in ids]

    def damage_counts(self) -> dict[str, int]:
        codes, counts = np.unique(self.damage[self.damage > 0], return_counts=True)
        return {OPEN_DAMAGE[int(c)]: int(k) for c, k in zip(codes, counts, strict=True)}

    def stats(self) -> tuple[list[float], list[float]]:
        s = self.meta["stats"]
        return s["mean"], s["std"]

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.directory / self.shard_names[shard], os.O_RDONLY)
        return fd

    def _pread(self, shard: int, size: int, offset: int, key: str) -> bytes:
        try:
            blob = os.pread(self._fd(shard), size, offset)
        except OSError as err:
            raise ShardError(f"{key}: cannot read {self.shard_names[shard]}: {err.strerror}", "unreadable") from None
        if len(blob) != size:
            raise ShardError(f"{key}: {self.shard_names[shard]} ends before this sample", "truncated")
        return blob

    def _relocate(self, shard: int, key: str, fbank_name: str) -> tuple[bytes, bytes]:
        """Read the two members by name after scanning the shard's headers (the index's offsets are stale)."""
        members = self._members.get(shard, (None,))[0]
        if members is None:
            fd = self._fd(shard)
            self._members[shard] = scan_members(fd, os.fstat(fd).st_size)
            members = self._members[shard][0]
            log.warning("%s does not match its index at %s; located its members by scanning the tar headers",
                        self.shard_names[shard], key)
        spans = [members.get(fbank_name), members.get(f"{key}.{JSON_EXT}")]
        missing = [n for n, s in zip((fbank_name, f"{key}.{JSON_EXT}"), spans, strict=True) if s is None]
        if missing:
            raise ShardError(f"{key}: member {', '.join(missing)} is missing from {self.shard_names[shard]}",
                             "missing_member")
        return tuple(self._pread(shard, s[1], s[0], key) for s in spans)  # type: ignore[index,return-value]

    def read(self, i: int) -> tuple[np.ndarray, str]:
        """Features (frames, 80) float16 and transcript of utterance ``i``; raises ShardError if damaged."""
        key, shard, n = self.key(i), int(self.shard_id[i]), int(self.num_frames[i])
        if self.damage[i]:
            raise ShardError(f"{key}: {OPEN_DAMAGE[int(self.damage[i])]}", OPEN_DAMAGE[int(self.damage[i])])
        start, fo, fs = int(self.offset[i]), int(self.fbank_offset[i]), int(self.fbank_size[i])
        jo, js = int(self.json_offset[i]), int(self.json_size[i])
        fbank_name = f"{key}.{FBANK_ZST_EXT if self.compressed else FBANK_EXT}"
        try:
            blob = self._pread(shard, jo + js - start, start, key)
            heads = (tar_header(blob[:BLOCK]), tar_header(blob[jo - BLOCK - start: jo - start]))
        except ShardError as err:
            if err.reason != "truncated":
                raise
            heads = (None, None)  # the file is shorter than the index says: the sample may have moved
        if heads[0] == (fbank_name, fs) and heads[1] == (f"{key}.{JSON_EXT}", js) and fo == start + BLOCK:
            payload, js_bytes = blob[BLOCK: BLOCK + fs], blob[jo - start:]
        else:
            payload, js_bytes = self._relocate(shard, key, fbank_name)
        if self.compressed:
            from lmu_asr.prep.shards import decode_fbank

            try:
                feats = decode_fbank(payload, compressed=True)
            except Exception as err:  # zstd raises its own error type
                raise ShardError(f"{key}: cannot decompress the fbank member ({err})", "bad_npy") from None
            if feats.dtype != np.float16 or feats.shape != (n, 80):
                raise ShardError(f"{key}: fbank holds {feats.dtype} {feats.shape}, the index says float16 "
                                 f"({n}, 80)", "shape_mismatch")
            check_finite(feats, key)
        else:
            feats = parse_npy(payload, n, key)
        try:
            text = json.loads(js_bytes)["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
        except (ValueError, KeyError, TypeError) as err:
            raise ShardError(f"{key}: unreadable json member ({err})", "bad_json") from None
        if self.text_len[i] and len(text) != int(self.text_len[i]):
            raise ShardError(f"{key}: the transcript has {len(text)} characters, the index says "
                             f"{int(self.text_len[i])}", "text_mismatch")
        return feats, text

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __reduce__(self) -> tuple:
        """Workers reopen the memory-mapped cache instead of receiving the columns (a few hundred bytes, not GBs)."""
        if self.cache_path is not None:
            return (_reopen, (self.directory, self.cache_path, self.shard_sizes))
        state = {k: v for k, v in self.__dict__.items() if k not in ("_files", "_members")}
        return (_restore, (state,))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _from_table(directory: Path, meta: dict, table: Any, cache: Path | None,
                shard_sizes: np.ndarray | None = None) -> ShardSet:
    from lmu_asr.data.index import NUMERIC, column

    names = json.loads(table.schema.metadata[b"shard_names"])
    keys = table.column("key")
    keys = keys.chunk(0) if keys.num_chunks == 1 else keys.combine_chunks()
    return ShardSet.from_arrays(directory, meta, names, shard_sizes=shard_sizes, keys_array=keys, cache_path=cache,
                                **{name: column(table, name) for name in NUMERIC})


def _reopen(directory: Path, cache_path: Path, shard_sizes: np.ndarray) -> ShardSet:
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(cache_path), "r")).read_all()
    return _from_table(directory, json.loads((directory / "meta.json").read_text()), table, cache_path, shard_sizes)


def _restore(state: dict) -> ShardSet:
    out = ShardSet.__new__(ShardSet)
    out.__dict__.update(state)
    out._files, out._members = {}, {}
    return out
