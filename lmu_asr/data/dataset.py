"""Batches as tensors: a map-style dataset over a plan's batches, and the DataLoader around it.

Each item is a whole batch (static shape per bucket), assembled in a worker process: features stay float16 until
they reach the device (half the host->device bytes), targets are a (B, S) matrix with true lengths (S =
bucket // downsample, static). Pinned memory and ``non_blocking`` copies let the next batch's transfer overlap the
current step. A damaged sample becomes an empty row; its key and reason are in the item's ``damaged`` list (the
trainer and ``eval`` count and report them): training goes on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lmu_asr.data.sampler import Batch
from lmu_asr.data.shards import ShardSet
from lmu_asr.prep.shards import ShardError
from lmu_asr.text import encode

log = logging.getLogger(__name__)


class BatchDataset(Dataset):
    """Assembles batches; an item is a batch, addressed by its position in ``batches`` or by the Batch itself.

    Addressed by Batch (what :class:`PlanSampler` yields), the dataset holds no plan at all: a DataLoader worker
    receives the shards (a memory-mapped index, reopened by path) once, lives across epochs, and gets each
    batch's few hundred indices through the index queue.
    """

    def __init__(self, shards: ShardSet, batches: Sequence[Batch] | None, downsample: int,
                 with_text: bool = False) -> None:
        self.shards, self.downsample, self.with_text = shards, downsample, with_text
        self.batches = list(batches) if batches is not None else []

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, key: int | Batch) -> dict:
        b = key if isinstance(key, Batch) else self.batches[key]
        return assemble_batch(b, self.shards.read, self.shards.key, self.downsample, self.with_text)


class FeaturePool:
    """A DataLoader worker's ring of shared-memory batch buffers, reused batch after batch.

    A batch leaves a worker through shared memory; torch gives every new tensor a fresh segment, which both
    processes must map and fault in page by page, and the parent does so serially for all workers. Measured on
    the 2-core CPU (a 96 x 400 x 80 float16 batch, one worker): 7.2 ms per batch with fresh segments, 1.4 ms
    when the worker writes into buffers it already sent (the parent's mapping is cached by torch). A buffer is
    written again only ``slots`` batches later; ``make_loader`` sizes ``slots`` so that the parent, which holds at
    most ``hold`` received batches besides the ``prefetch`` in flight, is done with it by then.

    One buffer holds a whole batch, features and integer tensors alike (:func:`assemble_batch` packs them):
    every shared tensor costs the parent a socket round trip to the worker (torch passes its file descriptor,
    cached mapping or not), and that worker is busy assembling the next batch. Measured on the 2-core CPU
    (a100-b96 batches, 2 workers kept ahead, median of 44): 1.7-2.0 ms per batch in ``next()`` with four
    tensors, 1.1-1.35 with one.
    """

    def __init__(self, slots: int) -> None:
        self.storages: list[torch.UntypedStorage | None] = [None] * slots
        self.next = 0

    def take_bytes(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 tensor of ``nbytes`` in the next buffer (grown when too small)."""
        slot, self.next = self.next, (self.next + 1) % len(self.storages)
        storage = self.storages[slot]
        if storage is None or storage.nbytes() < nbytes:
            storage = self.storages[slot] = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


_POOL: FeaturePool | None = None  # set in DataLoader workers by make_loader's worker_init_fn


def _init_worker_pool(slots: int, _worker_id: int) -> None:
    global _POOL
    _POOL = FeaturePool(slots)


def assemble_batch(b: Batch, read: Callable[[int], tuple[np.ndarray, str]], key_of: Callable[[int], str],
                   downsample: int, with_text: bool = False) -> dict:
    """A batch's tensors from its utterances; ``read(i)`` gives (features, text) or raises ShardError.

    Shared by the random-access loader (``ShardSet.read``) and the streaming one (samples already received).
    In a worker of ``make_loader`` the whole batch goes into one buffer of the worker's :class:`FeaturePool`
    (the item carries it as ``packed``; :func:`unpack_batch` gives the tensors back in the parent); every value
    past a row's length, and every unused row, is written as 0, exactly as in a fresh zeroed array.
    """
    S, B = b.bucket // downsample, b.capacity
    shape = (B, b.bucket, 80)
    if _POOL is not None:  # one shared buffer: features, then lengths, target lengths and targets (int64)
        packed = _POOL.take_bytes(_packed_bytes(B, b.bucket, S))
        feats, ints = _unpacked_views(packed, B, b.bucket, S)
        feats, ints = feats.numpy(), ints.numpy()
        ints[:] = 0
        lengths, target_lengths, targets = ints[:B], ints[B:2 * B], ints[2 * B:].reshape(B, S)
    else:
        packed = None
        feats = np.zeros(shape, dtype=np.float16)
        lengths = np.zeros(B, dtype=np.int64)
        targets = np.zeros((B, S), dtype=np.int64)
        target_lengths = np.zeros(B, dtype=np.int64)
    texts, keys, damaged = [], [], []
    for row, i in enumerate(b.indices.tolist()):
        key = key_of(i)
        try:
            x, text = read(i)
            try:
                ids = encode(text)
            except ValueError as err:
                raise ShardError(f"{key}: {err}", "text_outside_vocabulary") from None
            if len(ids) > S and not with_text:  # the plan only schedules feasible utterances
                raise ShardError(f"{key}: transcript longer than the index says", "text_mismatch")
        except ShardError as err:
            log.warning("skipping a damaged sample: %s", err)
            damaged.append({"key": key, "reason": err.reason, "detail": str(err)})
            texts.append("")
            keys.append(key)
            continue
        feats[row, : x.shape[0]] = x
        lengths[row] = x.shape[0]
        if len(ids) <= S:  # else (evaluation only) scored for WER, left out of the loss
            targets[row, : len(ids)] = ids
            target_lengths[row] = len(ids)
        texts.append(text)
        keys.append(key)
    common = {"real": b.real - len(damaged), "skipped": len(damaged), "damaged": damaged}
    if packed is not None:  # a reused buffer: zero past each row's length (damaged and unused rows have 0)
        for row, n in enumerate(lengths.tolist()):
            feats[row, n:] = 0
        item = {"packed": packed, "layout": (B, b.bucket, S), **common}  # unpack_batch, in the parent
    else:
        item = {"feats": torch.from_numpy(feats), "lengths": torch.from_numpy(lengths),
                "targets": torch.from_numpy(targets), "target_lengths": torch.from_numpy(target_lengths), **common}
    if with_text:
        item["texts"], item["keys"] = texts, keys
    return item


def _packed_bytes(B: int, T: int, S: int) -> int:
    return 2 * B * T * 80 + 8 * (2 * B + B * S)  # float16 features first: the int64 part starts 8-aligned


def _unpacked_views(packed: torch.Tensor, B: int, T: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = 2 * B * T * 80
    return packed[:n].view(torch.float16).view(B, T, 80), packed[n:_packed_bytes(B, T, S)].view(torch.int64)


def unpack_batch(item: dict) -> dict:
    """A pooled worker's batch (one ``packed`` buffer) as the usual tensors: views, no copy (pinned stays pinned)."""
    if "packed" not in item:
        return item
    B, T, S = item["layout"]
    feats, ints = _unpacked_views(item["packed"], B, T, S)
    rest = {k: v for k, v in item.items() if k not in ("packed", "layout")}
    return {"feats": feats, "lengths": ints[:B], "target_lengths": ints[B:2 * B],
            "targets": ints[2 * B:].view(B, S), **rest}


class BatchLoader:
    """The DataLoader of :func:`make_loader`, yielding unpacked batches (:func:`unpack_batch`)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict]:
        return map(unpack_batch, iter(self.loader))

    def __len__(self) -> int:
        return len(self.loader)


class PlanSampler(Sampler):
    """Yields an epoch's batches (from ``start``, for an exact resume); ``set`` installs the next epoch's plan.

    One sampler and one DataLoader serve the whole run: ``persistent_workers`` keeps the workers (and their open
    shards) alive across epochs, where a loader per epoch would start them all again.
    """

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.start = 0

    def set(self, batches: list[Batch], start: int = 0) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)


def make_loader(dataset: BatchDataset, start: int = 0, num_workers: int = 2, prefetch: int = 4,
                pin_memory: bool = False, sampler: PlanSampler | None = None, hold: int = 1) -> BatchLoader:
    """Batches in order; workers take whole batches round-robin (order is deterministic).

    Without a sampler: ``dataset.batches[start:]``, workers for this pass only. With a :class:`PlanSampler`:
    whatever plan it holds when the loader is iterated, and persistent workers. ``hold``: how many received
    batches the caller keeps at once (the trainer: ``grad_accum`` micro-batches); a worker reuses its feature
    buffers (:class:`FeaturePool`) only ``prefetch + hold + 2`` of its batches later. A caller that keeps batches
    longer must say so, or pass ``hold`` large enough.
    """
    init = functools.partial(_init_worker_pool, prefetch + hold + 2) if num_workers > 0 else None
    return BatchLoader(DataLoader(
        dataset, batch_size=None, sampler=sampler if sampler is not None else range(start, len(dataset)),
        num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch if num_workers > 0 else None,
        persistent_workers=sampler is not None and num_workers > 0, worker_init_fn=init))


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch (non_blocking from pinned memory); features stay float16 on the wire.

    Keys ending in ``_host`` stay where they are: host copies the step reads without touching the device.
    """
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and not k.endswith("_host") else v)
            for k, v in batch.items()}
