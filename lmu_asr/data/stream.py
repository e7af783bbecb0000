"""Shards that are not local files: webdataset URLs, streamed whole and in order with the upstream library.

``--shards`` takes webdataset's URL conventions: ``https://host/path/shard-{000000..000575}.tar``, ``pipe:aws s3
cp s3://bucket/shard-{000000..000575}.tar -``, ``file:/data/shard-{...}.tar``. ``index.parquet`` and ``meta.json`` are
fetched once from the same prefix (the shard's file name replaced in the URL or command) into
``$LMU_ASR_CACHE/remote-<hash>/``, where the usual memory-mapped index cache is built; ``meta.json`` is fetched on
every start and the index again whenever it changed.

The plan is the local loader's, made from the index alone, at shard granularity: each epoch the shard order is
shuffled (seeded), the sequence is cut into one contiguous piece of shards per rank and per DataLoader worker
with about equal frames, and each worker's piece goes, as one sequential stream, through the same emulated
shuffle buffer and bucketer as local training (``sampler.shuffle_buffer``, ``sampler.make_batches``): the same
bucket lengths and rows, so the same compiled shapes. With one rank and one stream (``--workers 0`` or 1) the
plan *is* the local plan: training from URLs gives bit-identical losses to training from the files (tested).

A worker reads its shards front to back with ``webdataset.WebDataset`` and keeps only the samples its pending
batches need (about a shuffle buffer's worth); a batch is emitted as soon as the stream has passed its last
member. Workers' batches are merged in a fixed round-robin order, so the run is deterministic for a given
worker count. Resume is exact: a resumed worker restarts reading at the first shard it still needs (shard
granularity of the *reading*) and emits exactly the batches an uninterrupted run would have.

Evaluation (``--dev-shards``, ``eval``, ``tune-lm``, and ``verify`` reads each shard once) streams the same way, with
a plan of its own (:func:`eval_stream_plan`): every readable utterance once, no shuffle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmu_asr import UserError
from lmu_asr.config import DataConfig
from lmu_asr.data.dataset import assemble_batch
from lmu_asr.data.sampler import Batch, PlanStats, eligible, eval_setup, make_batches, shuffle_buffer
from lmu_asr.data.shards import ShardSet, parse_npy
from lmu_asr.fileio import atomic_write
from lmu_asr.prep.shards import ShardError

log = logging.getLogger(__name__)

SCHEMES = ("http://", "https://", "pipe:", "file:")
_TAR = re.compile(r"[^/\s]+\.tar")


def is_url(spec: str | Path) -> bool:
    return str(spec).startswith(SCHEMES)


@dataclass
class RemoteShards:
    """The shard URLs of a ``--shards`` spec (brace patterns expanded) and where their siblings live."""

    spec: str
    urls: list[str]

    @classmethod
    def parse(cls, spec: str) -> RemoteShards:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
        if not urls or not all(_TAR.search(u) for u in urls):
            raise UserError(f"shards {spec!r}: expected URLs of .tar shards (e.g. https://host/shard-{{000000.."
                            "000009}.tar)")
        if spec.startswith(("http://", "https://")) and shutil.which("curl") is None:
            raise UserError("streaming http(s) shards needs curl (webdataset reads URLs with it)")
        return cls(spec, urls)

    @property
    def names(self) -> list[str]:
        return [_TAR.findall(u)[-1] for u in self.urls]

    def url_of(self, name: str) -> str:
        """The URL (or command) that streams the shard file ``name``."""
        return self.urls[self.names.index(name)]

    @property
    def label(self) -> str:
        """A short name for reports: the folder the shards sit in (``gs-dev`` of ``s3://b/gs-dev/shard-...``)."""
        url = self.urls[0]
        folder = re.split(r"[/\s:]+", url[: list(_TAR.finditer(url))[-1].start()].rstrip("/"))[-1]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", folder).strip("._")
        return name or "remote"

    def sibling(self, name: str) -> str:
        """The URL (or command) of a file next to the shards: the shard's file name replaced by ``name``."""
        url = self.urls[0]
        found = list(_TAR.finditer(url))[-1]
        return url[: found.start()] + name + url[found.end():]

    def fetch(self, name: str) -> bytes:
        from webdataset.gopen import gopen

        url = self.sibling(name)
        try:
            with gopen(url, "rb") as f:
                data = f.read()
        except Exception as err:  # curl / pipe failures surface as various exception types
            raise UserError(f"cannot fetch {name} from {url}: {why_unreadable(url, err)}") from None
        if not data:
            raise UserError(f"cannot fetch {name} from {url}: empty answer")
        return data


# curl's exit statuses a user meets most (curl is run with -f: an HTTP status >= 400 is exit 22)
_CURL = {6: "cannot resolve the host", 7: "cannot connect to the host", 22: "the server answered with an HTTP "
         "error (no such file, or no permission)", 28: "timed out", 35: "TLS handshake failed"}


def why_unreadable(url: str, err: Exception) -> str:
    """One line for a failed fetch: webdataset reports a failed curl or pipe command as an OSError that holds
    the whole command line and its exit status; the status is what the user needs."""
    found = re.search(r"exit (-?\d+)", str(err))
    if found is None:
        return f"{type(err).__name__}: {err}"
    code = int(found.group(1))
    if url.startswith(("http://", "https://")):
        return f"curl exited {code}" + (f" ({_CURL[code]})" if code in _CURL else "")
    return f"the command exited {code}"


def open_remote(spec: str) -> tuple[ShardSet, RemoteShards]:
    """Fetch the index and meta of a URL shard set into the local cache and open it (index only, no shards)."""
    remote = RemoteShards.parse(spec)
    root = Path(os.environ.get("LMU_ASR_CACHE", Path.home() / ".cache" / "lmu-asr"))
    local = root / f"remote-{hashlib.sha1(spec.encode()).hexdigest()[:16]}"
    local.mkdir(parents=True, exist_ok=True)
    meta = remote.fetch("meta.json")
    try:
        sizes = {s["name"]: int(s["bytes"]) for s in json.loads(meta)["shards"]}
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{remote.sibling('meta.json')} is not an lmu-asr meta.json ({err})") from None
    # another rank may be filling the same cache: index.parquet can exist before meta.json (written last, atomically)
    cached = local / "meta.json"
    if not (local / "index.parquet").is_file() or not cached.is_file() or cached.read_bytes() != meta:
        atomic_write(local / "index.parquet", remote.fetch("index.parquet"))
        atomic_write(local / "meta.json", meta)
    missing = sorted(set(sizes) - set(remote.names))
    if missing:
        raise UserError(f"--shards names {len(remote.names)} shard(s) but the index lists {len(sizes)}; "
                        f"missing e.g. {missing[0]}")
    return ShardSet.open(local, shard_sizes=sizes), remote


def _split(weights: np.ndarray, parts: int) -> list[np.ndarray]:
    """Positions 0..n-1 cut into ``parts`` contiguous pieces of about equal total weight (by midpoints)."""
    if parts <= 1 or not len(weights):
        return [np.arange(len(weights))] + [np.arange(0)] * (parts - 1)
    mid = np.cumsum(weights, dtype=np.float64) - weights / 2
    owner = np.minimum((mid * parts / max(weights.sum(), 1)).astype(np.int64), parts - 1)
    return [np.flatnonzero(owner == p) for p in range(parts)]


def stream_plan(shards: ShardSet, cfg: DataConfig, downsample: int, epoch: int, seed: int, rank: int, world: int,
                workers: int) -> tuple[list[list[Batch]], list[list[int]], PlanStats]:
    """Per worker: its batches, and the shard ids it streams in order (see the module docstring)."""
    mask, skipped = eligible(shards, cfg, downsample)
    stats = PlanStats(skipped=skipped)
    n_shards = len(shards.shard_names)
    order = np.random.default_rng([seed, epoch]).permutation(n_shards)  # as the local plan orders shards
    frames = np.bincount(shards.shard_id[mask], weights=shards.num_frames[mask], minlength=n_shards)
    mine = order[_split(frames[order], world)[rank]]
    streams = max(1, workers)
    plans, shard_lists = [], []
    for w, piece in enumerate(_split(frames[mine], streams)):
        ids = mine[piece]
        rows = _read_order(shards, mask, ids)
        rng = np.random.default_rng([seed, epoch, rank, 1] if streams == 1 else [seed, epoch, rank, 1, w])
        plans.append(make_batches(shuffle_buffer(rows, cfg.shuffle_buffer, rng), shards, cfg, downsample, stats))
        shard_lists.append(ids.tolist())
    return plans, shard_lists, stats


def eval_stream_plan(shards: ShardSet, cfg: DataConfig, downsample: int, rank: int, world: int,
                     workers: int) -> tuple[list[list[Batch]], list[list[int]], PlanStats]:
    """Evaluation from URLs: every readable utterance once, as ``sampler.eval_plan`` scores a local set.

    The shards keep their stored order (a score does not depend on it), cut into contiguous pieces per rank and
    per worker by frames, as in training; each worker's stream goes through the bucketer unshuffled. A batch
    pads to its bucket's length however its rows are ordered, so this pads as little as the folder's
    length-sorted plan (only the last, partial batch of each bucket differs), and a worker holds at most one
    unfilled batch per bucket."""
    eval_cfg, stats = eval_setup(shards, cfg)
    mask = shards.usable
    frames = np.bincount(shards.shard_id[mask], weights=shards.num_frames[mask], minlength=len(shards.shard_names))
    mine = _split(frames, world)[rank]
    plans, shard_lists = [], []
    for piece in _split(frames[mine], max(1, workers)):
        ids = mine[piece]
        plans.append(make_batches(_read_order(shards, mask, ids), shards, eval_cfg, downsample, stats))
        shard_lists.append(ids.tolist())
    return plans, shard_lists, stats


def _read_order(shards: ShardSet, mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The rows of shards ``ids`` (in that order) that ``mask`` keeps, in the order a stream of them delivers."""
    rank_of = np.empty(len(shards.shard_names), np.int64)
    rank_of[ids] = np.arange(len(ids))
    rows = np.flatnonzero(mask & np.isin(shards.shard_id, ids))
    return rows[np.lexsort((shards.position[rows], rank_of[shards.shard_id[rows]]))]


def interleave(plans: list[list[Batch]]) -> list[tuple[int, int]]:
    """The fixed merge order of the workers' batches: round robin, skipping workers that are done."""
    out, k = [], 0
    while any(k < len(p) for p in plans):
        out += [(w, k) for w, p in enumerate(plans) if k < len(p)]
        k += 1
    return out


class StreamDataset(IterableDataset):
    """Each DataLoader worker streams its own shards and yields (position in the merged order, batch)."""

    def __init__(self, shards: ShardSet, remote: RemoteShards, plans: list[list[Batch]],
                 shard_lists: list[list[int]], order: list[tuple[int, int]], start: int, downsample: int,
                 with_text: bool = False) -> None:
        self.shards, self.remote, self.downsample, self.with_text = shards, remote, downsample, with_text
        self.plans, self.shard_lists = plans, shard_lists
        self.positions: list[dict[int, int]] = [{} for _ in plans]
        for pos, (w, k) in enumerate(order):
            self.positions[w][k] = pos
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        info = get_worker_info()
        workers = range(len(self.plans)) if info is None else [info.id]
        for w in workers:  # without worker processes one process streams every piece, in merge order below
            yield from self._worker(w)

    def _worker(self, w: int) -> Iterator[tuple[int, dict]]:
        todo = [(k, b) for k, b in enumerate(self.plans[w]) if self.positions[w].get(k, -1) >= self.start]
        if not todo:
            return
        needed = np.concatenate([b.indices for _, b in todo])
        shard_of = self.shards.shard_id[needed]
        wanted = set(shard_of.tolist())
        rows_by_key = {self.shards.key(int(i)): int(i) for i in needed}
        got: dict[int, tuple[np.ndarray, str] | ShardError] = {}
        next_batch = 0

        def ready() -> Iterator[tuple[int, dict]]:
            nonlocal next_batch
            while next_batch < len(todo) and all(int(i) in got for i in todo[next_batch][1].indices):
                k, b = todo[next_batch]
                yield self.positions[w][k], self._assemble(b, got)
                for i in b.indices.tolist():
                    got.pop(i, None)
                next_batch += 1

        for s in self.shard_lists[w]:  # a resumed worker starts at the first shard it still needs
            if s not in wanted:
                continue
            for i, sample in self._samples(s, rows_by_key):
                got[i] = sample
                yield from ready()
            for i in needed[shard_of == s].tolist():  # the shard is done: what did not come is missing
                got.setdefault(i, ShardError(f"{self.shards.key(i)}: not in the streamed shard", "missing_member"))
            yield from ready()

    def _samples(self, shard: int, rows_by_key: dict[str, int]) -> Iterator[tuple[int, object]]:
        import webdataset as wds

        url = self.remote.url_of(self.shards.shard_names[shard])
        stream = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                empty_check=False, handler=wds.warn_and_continue)
        for sample in stream:
            i = rows_by_key.get(sample.get("__key__", ""))
            if i is None:
                continue  # a sample this worker's remaining batches do not need
            yield i, self._decode(i, sample)

    def _decode(self, i: int, sample: dict) -> tuple[np.ndarray, str] | ShardError:
        key = self.shards.key(i)
        try:
            payload, meta = sample.get("fbank.npy"), sample.get("json")
            if payload is None or meta is None:
                raise ShardError(f"{key}: a member is missing from the stream", "missing_member")
            feats = parse_npy(payload, int(self.shards.num_frames[i]), key)
            text = json.loads(meta)["text"]
            if len(text) != int(self.shards.text_len[i]):
                raise ShardError(f"{key}: the transcript does not match the index", "text_mismatch")
            return feats, text
        except ShardError as err:
            return err
        except (ValueError, KeyError, TypeError) as err:
            return ShardError(f"{key}: unreadable json member ({err})", "bad_json")

    def _assemble(self, b: Batch, got: dict) -> dict:
        def read(i: int) -> tuple[np.ndarray, str]:
            value = got[i]
            if isinstance(value, ShardError):
                raise value
            return value

        return assemble_batch(b, read, self.shards.key, self.downsample, self.with_text)


def ordered(items: Iterator[tuple[int, dict]], start: int) -> Iterator[dict]:
    """Batches in merge order, whatever order the workers' results arrive in (a few held at most)."""
    pending: dict[int, dict] = {}
    want = start
    for pos, batch in items:
        pending[pos] = batch
        while want in pending:
            yield pending.pop(want)
            want += 1
    yield from (pending[p] for p in sorted(pending))


def stream_loader(shards: ShardSet, remote: RemoteShards, cfg: DataConfig, downsample: int, epoch: int, seed: int,
                  rank: int, world: int, start: int, limit: int, pin_memory: bool) -> Iterator[dict]:
    """This rank's batches of one epoch from ``start`` (of ``limit``, the count every rank agreed on)."""
    plans, shard_lists, _ = stream_plan(shards, cfg, downsample, epoch, seed, rank, world, cfg.num_workers)
    return _load(StreamDataset(shards, remote, plans, shard_lists, interleave(plans)[:limit], start, downsample),
                 cfg.num_workers, cfg.prefetch, pin_memory)


def eval_stream_loader(shards: ShardSet, remote: RemoteShards, cfg: DataConfig, downsample: int, rank: int,
                       world: int) -> tuple[Iterator[dict], PlanStats]:
    """This rank's evaluation batches from URLs (see eval_stream_plan), with as many workers as a local
    evaluation uses (at most 2), and the plan's stats."""
    workers = min(cfg.num_workers, 2)
    plans, shard_lists, stats = eval_stream_plan(shards, cfg, downsample, rank, world, workers)
    dataset = StreamDataset(shards, remote, plans, shard_lists, interleave(plans), 0, downsample, with_text=True)
    return _load(dataset, workers, 2, False), stats


def _load(dataset: StreamDataset, workers: int, prefetch: int, pin_memory: bool) -> Iterator[dict]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch if workers else None)
    return (b for b in ordered(iter(loader), dataset.start) if b is not None)


def open_shards(spec: str | Path) -> tuple[ShardSet, RemoteShards | None]:
    """A shard set named by its folder, or by webdataset URLs (then its index is fetched: see open_remote)."""
    if is_url(spec):
        return open_remote(str(spec))
    return ShardSet.open(Path(spec)), None


def set_label(spec: str | Path, remote: RemoteShards | None) -> str:
    """A shard set's short name for report file names: its folder's name, or the URLs' folder."""
    return remote.label if remote is not None else Path(spec).resolve().name


def stream_batch_count(shards: ShardSet, cfg: DataConfig, downsample: int, epoch: int, seed: int, rank: int,
                       world: int) -> int:
    plans, _, _ = stream_plan(shards, cfg, downsample, epoch, seed, rank, world, cfg.num_workers)
    return sum(len(p) for p in plans)
