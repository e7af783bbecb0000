"""Batches as tensors: a map-style dataset over a plan's batches, and the DataLoader around it.

Each item is a whole batch (static shape per bucket), assembled in a worker process: features stay float16 until
they reach the device (half the host->device bytes), targets are a (B, S) matrix with true lengths (S =
bucket // downsample, static). Pinned memory and ``non_blocking`` copies let the next batch's transfer overlap the
current step. A damaged sample becomes an empty row; its key and reason are in the item's ``damaged`` list (the
trainer and ``eval`` count and report them): training goes on.
"""

from __future__ import annotations

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


def assemble_batch(b: Batch, read: Callable[[int], tuple[np.ndarray, str]], key_of: Callable[[int], str],
                   downsample: int, with_text: bool = False) -> dict:
    """A batch's tensors from its utterances; ``read(i)`` gives (features, text) or raises ShardError.

    Shared by the random-access loader (``ShardSet.read``) and the streaming one (samples already received).
    """
    S = b.bucket // downsample
    feats = np.zeros((b.capacity, b.bucket, 80), dtype=np.float16)
    lengths = np.zeros(b.capacity, dtype=np.int64)
    targets = np.zeros((b.capacity, S), dtype=np.int64)
    target_lengths = np.zeros(b.capacity, dtype=np.int64)
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
    item = {"feats": torch.from_numpy(feats), "lengths": torch.from_numpy(lengths),
            "targets": torch.from_numpy(targets), "target_lengths": torch.from_numpy(target_lengths),
            "real": b.real - len(damaged), "skipped": len(damaged), "damaged": damaged}
    if with_text:
        item["texts"], item["keys"] = texts, keys
    return item


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
                pin_memory: bool = False, sampler: PlanSampler | None = None) -> DataLoader:
    """Batches in order; workers take whole batches round-robin (order is deterministic).

    Without a sampler: ``dataset.batches[start:]``, workers for this pass only. With a :class:`PlanSampler`:
    whatever plan it holds when the loader is iterated, and persistent workers.
    """
    return DataLoader(dataset, batch_size=None, sampler=sampler if sampler is not None else range(start, len(dataset)),
                      num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch if num_workers > 0 else None,
                      persistent_workers=sampler is not None and num_workers > 0)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch (non_blocking from pinned memory); features stay float16 on the wire.

    Keys ending in ``_host`` stay where they are: host copies the step reads without touching the device.
    """
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and not k.endswith("_host") else v)
            for k, v in batch.items()}
