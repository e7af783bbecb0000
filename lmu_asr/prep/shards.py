"""The shard format (a contract): writing deterministic WebDataset tars, their DALI indexes, and reading them back.

Each utterance is a WebDataset sample with key ``KEY`` and two members, in this order::

    KEY.fbank.npy   numpy .npy, float16, shape (frames, 80)   (KEY.fbank.npy.zst with --compress zstd)
    KEY.json        {"text", "duration", "num_frames", "speaker", "recording", "start"}

Plain ``tar tf``, numpy and the upstream ``webdataset`` library read it without project code. Tars are written
byte-deterministically (ustar headers, mtime 0, uid/gid 0, fixed member order), so a resumed prep produces the same
bytes as an uninterrupted one. Alongside each ``shard-NNNNNN.tar`` we write ``shard-NNNNNN.idx`` in the format of
DALI's ``wds2idx`` (v1.2), which ``fn.readers.webdataset(index_paths=...)`` needs.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmu_asr.fileio import atomic_write

FBANK_EXT = "fbank.npy"
FBANK_ZST_EXT = "fbank.npy.zst"
JSON_EXT = "json"
BLOCK = 512
MAX_KEY_LEN = 80  # keeps every member name within a single ustar header (100 bytes)
NPY_HEADER = 128  # np.save header of a 2-D float16 array: magic + length + dict, padded to 64 bytes


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


@dataclass
class MemberSpan:
    header_offset: int
    data_offset: int
    size: int


class ShardWriter:
    """Writes one shard to ``path`` via a temporary name; ``close()`` renames it into place (atomic)."""

    def __init__(self, path: str | Path, compress: str | None = None) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.compress = compress
        self._zstd = None
        if compress == "zstd":
            import zstandard

            self._zstd = zstandard.ZstdCompressor(level=3)
        elif compress not in (None, "none"):
            raise ValueError(f"unknown compression {compress!r} (use zstd or none)")
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.idx_lines: list[str] = []

    def _add(self, name: str, data: bytes) -> MemberSpan:
        header_offset = self._tar.offset
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        padded = -(-len(data) // BLOCK) * BLOCK
        return MemberSpan(header_offset, self._tar.offset - padded, len(data))

    def add(self, key: str, fbank: np.ndarray, meta: dict) -> dict[str, int]:
        """Append one utterance; returns its byte spans for the index."""
        if len(key) > MAX_KEY_LEN or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}")
        payload = npy_bytes(fbank.astype(np.float16, copy=False))
        if 10 + int.from_bytes(payload[8:10], "little") != NPY_HEADER:  # readers (DALI) slice it off blindly
            raise ValueError(f"unexpected .npy header size for shape {fbank.shape}")
        ext = FBANK_EXT
        if self._zstd is not None:
            payload, ext = self._zstd.compress(payload), FBANK_ZST_EXT
        fb = self._add(f"{key}.{ext}", payload)
        js = self._add(f"{key}.{JSON_EXT}", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
        self.idx_lines.append(f"{ext} {fb.data_offset} {fb.size} {key}.{ext} "
                              f"{JSON_EXT} {js.data_offset} {js.size} {key}.{JSON_EXT}")
        return {"offset": fb.header_offset, "fbank_offset": fb.data_offset, "fbank_size": fb.size,
                "json_offset": js.data_offset, "json_size": js.size}

    def close(self) -> int:
        """Finish the tar and the DALI index, rename both into place; returns the shard's size in bytes."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        atomic_write(self.path.with_suffix(".idx"),
                     f"v1.2 {len(self.idx_lines)}\n" + "".join(line + "\n" for line in self.idx_lines))
        os.replace(self.tmp, self.path)
        return size

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def decode_fbank(payload: bytes, compressed: bool = False) -> np.ndarray:
    """The (frames, 80) float16 array of a ``fbank.npy`` (or ``.npy.zst``) member."""
    if compressed:
        import zstandard

        payload = zstandard.ZstdDecompressor().decompress(payload)
    return np.load(io.BytesIO(payload), allow_pickle=False)


class ShardError(Exception):
    """A shard (or one sample in it) is truncated or corrupt; ``reason`` is a short code for counting."""

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason


def tar_header(block: bytes) -> tuple[str, int] | None:
    """(member name, size) of a 512-byte ustar header block, or None when it is not a valid header.

    The checksum is verified (the sum of the header bytes with the checksum field read as spaces), so a block of
    feature data or a damaged header is never taken for a member.
    """
    if len(block) < BLOCK or block[257:262] != b"ustar":
        return None
    try:
        stored = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
        size = int(block[124:136].split(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        return None
    if stored != sum(block[:BLOCK]) - sum(block[148:156]) + 8 * 32:
        return None
    name = block[:100].split(b"\0")[0]
    prefix = block[345:500].split(b"\0")[0]
    full = (prefix + b"/" + name) if prefix else name
    return full.decode("utf-8", "replace"), size


def scan_members(fd: int, file_size: int) -> tuple[dict[str, tuple[int, int]], bool]:
    """(member name -> (data offset, size), whether the archive ends properly) of a tar, read header by header.

    When a header is damaged the scan moves on block by block until it finds the next valid header, so the
    members after a damaged one are still found (what a shard with one member removed or resized needs). The
    archive ends properly when the scan meets tar's end-of-archive zero block; a truncated shard does not.
    """
    members: dict[str, tuple[int, int]] = {}
    pos = 0
    while pos + BLOCK <= file_size:
        block = os.pread(fd, BLOCK, pos)
        if block == bytes(BLOCK):
            return members, True
        head = tar_header(block)
        if head is None:
            pos += BLOCK
            continue
        name, size = head
        if pos + BLOCK + size > file_size:
            break  # the last member is cut short
        members.setdefault(name, (pos + BLOCK, size))
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    return members, False


def read_sample(f, fbank_offset: int, fbank_size: int, json_offset: int, json_size: int,  # noqa: ANN001
                compressed: bool = False) -> tuple[np.ndarray, dict]:
    """Random access to one sample from an open shard file, by the byte spans in index.parquet (one read)."""
    f.seek(fbank_offset)
    blob = f.read(json_offset + json_size - fbank_offset)
    if len(blob) != json_offset + json_size - fbank_offset:
        raise ShardError("shard is truncated")
    try:
        feats = decode_fbank(blob[:fbank_size], compressed)
        meta = json.loads(blob[json_offset - fbank_offset:])
    except Exception as err:  # any decode failure means the bytes are not what the index promised
        raise ShardError(f"corrupt sample: {type(err).__name__}: {err}") from None
    return feats, meta


def iter_shard(path: str | Path) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Sequentially yield (key, fbank, meta) from a shard (no index needed); raises ShardError when damaged."""
    pending: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                entry = pending.setdefault(key, {})
                if ext in (FBANK_EXT, FBANK_ZST_EXT):
                    entry["fbank"] = decode_fbank(data, ext == FBANK_ZST_EXT)
                elif ext == JSON_EXT:
                    entry["json"] = json.loads(data)
                if "fbank" in entry and "json" in entry:
                    del pending[key]
                    yield key, entry["fbank"], entry["json"]
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        raise ShardError(f"{Path(path).name}: {err}") from None
