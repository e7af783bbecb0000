"""The shard index as memory-mapped columns, shared by every rank and DataLoader worker on a node.

``index.parquet`` (the contract prep writes) is compressed and row-oriented in spirit: reading it into Python lists
cost 268 s and 5.7 GB per process at GigaSpeech-XL size (8.3 M rows). On first open the reader turns it into an
uncompressed Arrow IPC file, ``.index-cache-v1.arrow`` beside it, holding only what training needs: fixed-width
columns (byte spans, frames, shard ids, the CTC feasibility bound computed once, vectorised) and the keys. Every
later open memory-maps that file: no parsing, no copies, and the pages are the page cache's, shared by all the
processes of a node. Texts are not in it: they are read from the shard with the features, when a batch is built.

The cache is tied to the exact ``index.parquet`` it was built from (size, mtime and a hash of its footer, which
holds the row groups' statistics); a changed index is re-read. It is written to a temporary name and renamed, under
an advisory lock so that 8 ranks opening a fresh folder at once build it once. When the shard folder is not
writable, the cache goes to ``$LMU_ASR_CACHE`` (default ``~/.cache/lmu-asr``); when that fails too, the columns are
kept in memory for this process (with a warning). ``lmuasr prep --reindex`` builds it ahead of time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from lmu_asr import UserError
from lmu_asr.fileio import atomic_open

log = logging.getLogger(__name__)

CACHE_NAME = ".index-cache-v1.arrow"
# column -> numpy dtype in the cache (narrow where the contract's ranges allow it)
NUMERIC = {"shard_id": np.int32, "position": np.int32, "offset": np.int64, "fbank_offset": np.int64,
           "fbank_size": np.int64, "json_offset": np.int64, "json_size": np.int32, "num_frames": np.int32,
           "min_out_frames": np.int32, "text_len": np.int32}
SOURCE_COLUMNS = ["key", "shard", "position", "offset", "fbank_offset", "fbank_size", "json_offset", "json_size",
                  "num_frames", "text"]


def parquet_signature(path: Path) -> str:
    """Identity of an index file: size, mtime and a hash of its last 64 KiB (the parquet footer)."""
    st = path.stat()
    with open(path, "rb") as f:
        f.seek(max(0, st.st_size - 65536))
        tail = f.read()
    return f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(tail).hexdigest()[:32]}"


def ctc_min_frames(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(characters, labels + adjacent repeats) per transcript, vectorised over the string buffer.

    CTC needs at least one output frame per label plus one blank between each pair of equal adjacent labels.
    Transcripts are normalised ASCII, so bytes are characters.
    """
    texts = pa.array(texts, pa.large_string()) if not isinstance(texts, pa.Array) else texts
    texts = texts.cast(pa.large_string())
    if texts.null_count:
        raise UserError("index.parquet has rows without a text")
    offsets = np.frombuffer(texts.buffers()[1], np.int64)[texts.offset: texts.offset + len(texts) + 1]
    data = np.frombuffer(texts.buffers()[2], np.uint8) if texts.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    data = data[: offsets[-1]] if len(offsets) else data[:0]  # a slice's buffer may run on past its last string
    if not len(data):
        return lengths.astype(np.int64), lengths.astype(np.int64)
    eq = np.zeros(len(data), np.uint8)  # eq[j]: byte j equals byte j + 1 (bytes, not int64: 0.5 GB at XL)
    np.equal(data[1:], data[:-1], out=eq[:-1].view(bool))
    starts = np.minimum(offsets[:-1], len(data) - 1)
    # sums over [start_i, start_{i+1}) count the pair that straddles into the next string too: remove it
    sums = np.add.reduceat(eq, starts, dtype=np.int64) - eq[np.maximum(offsets[1:] - 1, 0)]
    repeats = np.where(lengths > 1, sums, 0)
    return lengths.astype(np.int64), (lengths + repeats).astype(np.int64)


def build_table(index: Path) -> pa.Table:
    """The cache's table from ``index.parquet`` (vectorised: no per-row Python)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(index, columns=SOURCE_COLUMNS)
    except (OSError, pa.ArrowException, KeyError) as err:
        raise UserError(f"cannot read {index}: {str(err).splitlines()[0]}") from None
    shard = table.column("shard").combine_chunks().dictionary_encode()
    names = [str(n) for n in shard.dictionary.to_pylist()]
    order = np.argsort(np.array(names, dtype=object)).astype(np.int32)  # shard ids in name order
    rank = np.empty(len(names), np.int32)
    rank[order] = np.arange(len(names), dtype=np.int32)
    shard_id = rank[shard.indices.to_numpy(zero_copy_only=False)] if len(names) else np.zeros(0, np.int32)
    text_len, min_out = ctc_min_frames(table.column("text").combine_chunks())
    cols: dict[str, pa.Array] = {"key": pc.cast(table.column("key").combine_chunks(), pa.large_string())}
    for name, dtype in NUMERIC.items():
        if name == "shard_id":
            values = shard_id
        elif name == "min_out_frames":
            values = min_out
        elif name == "text_len":
            values = text_len
        else:
            column = table.column(name)
            if column.null_count:
                raise UserError(f"{index}: column {name} has missing values")
            values = column.to_numpy()
        cols[name] = pa.array(np.asarray(values).astype(dtype, copy=False))
    meta = {"shard_names": json.dumps(sorted(names))}
    return pa.table(cols).replace_schema_metadata(meta)


def _cache_locations(directory: Path) -> list[Path]:
    user = Path(os.environ.get("LMU_ASR_CACHE", Path.home() / ".cache" / "lmu-asr"))
    tag = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:16]
    return [directory / CACHE_NAME, user / f"index-{tag}.arrow"]


def _read_valid(path: Path, signature: str) -> pa.Table | None:
    """The memory-mapped cache at ``path`` if it was built from this exact index, else None."""
    if not path.is_file():
        return None
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        meta = reader.schema.metadata or {}
        if meta.get(b"signature", b"").decode() != signature:
            return None
        return reader.read_all()
    except (OSError, pa.ArrowException):
        return None  # a foreign or damaged file: rebuilt


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An advisory lock beside the cache (best effort: filesystems without locks just skip it)."""
    try:
        import fcntl

        f = open(path, "a+b")
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        f.close()


def _write(table: pa.Table, path: Path) -> None:
    with atomic_open(path) as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(len(table), 1))


def load_index(directory: Path, rebuild: bool = False) -> tuple[pa.Table, Path | None]:
    """(memory-mapped index table, cache path) for a shard folder, building the cache when needed."""
    index = directory / "index.parquet"
    signature = parquet_signature(index)
    if not rebuild:
        for path in _cache_locations(directory):
            table = _read_valid(path, signature)
            if table is not None:
                return table, path
    for path in _cache_locations(directory):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _lock(path.with_name(path.name + ".lock")):
                table = None if rebuild else _read_valid(path, signature)  # another rank may have built it
                if table is None:
                    built = build_table(index)
                    meta = {**built.schema.metadata, b"signature": signature.encode()}
                    _write(built.replace_schema_metadata(meta), path)
                    table = _read_valid(path, signature)
            if table is not None:
                return table, path
        except OSError as err:
            log.debug("cannot write the index cache at %s: %s", path, err)
    log.warning("could not write an index cache for %s anywhere; keeping the index in this process's memory",
                directory)
    built = build_table(index)
    return built.replace_schema_metadata({**built.schema.metadata, b"signature": signature.encode()}), None


def column(table: pa.Table, name: str) -> np.ndarray:
    """A zero-copy numpy view of a fixed-width column of the (memory-mapped) table."""
    col = table.column(name)
    chunk = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return chunk.to_numpy(zero_copy_only=True) if len(chunk) else np.zeros(0, NUMERIC[name])
