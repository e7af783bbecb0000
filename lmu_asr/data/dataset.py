"""Batches as tensors: a map-style dataset over a plan's batches, and the DataLoader around it.

Each item is a whole batch (static shape per bucket), assembled in a worker process: features stay float16 until
they reach the device (half the host->device bytes), targets are a (B, S) matrix with true lengths (S =
bucket // downsample, static). Pinned memory and ``non_blocking`` copies let the next batch's transfer overlap the
current step. A damaged sample becomes an empty row; its key and reason are in the item's ``damaged`` list (the
trainer and ``eval`` count and report them): training goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmu_asr.data.sampler import Batch
from lmu_asr.data.shards import ShardSet
from lmu_asr.prep.shards import ShardError
from lmu_asr.text import encode

log = logging.getLogger(__name__)


class BatchDataset(Dataset):
    def __init__(self, shards: ShardSet, batches: Sequence[Batch], downsample: int, with_text: bool = False) -> None:
        self.shards, self.batches, self.downsample, self.with_text = shards, list(batches), downsample, with_text

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        b = self.batches[k]
        S = b.bucket // self.downsample
        feats = np.zeros((b.capacity, b.bucket, 80), dtype=np.float16)
        lengths = np.zeros(b.capacity, dtype=np.int64)
        targets = np.zeros((b.capacity, S), dtype=np.int64)
        target_lengths = np.zeros(b.capacity, dtype=np.int64)
        texts, keys, damaged = [], [], []
        for row, i in enumerate(b.indices.tolist()):
            key = self.shards.key(i)
            try:
                x, text = self.shards.read(i)
                try:
                    ids = encode(text)
                except ValueError as err:
                    raise ShardError(f"{key}: {err}", "text_outside_vocabulary") from None
                if len(ids) > S and not self.with_text:  # the plan only schedules feasible utterances
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
                "index": k, "real": b.real - len(damaged), "skipped": len(damaged), "damaged": damaged}
        if self.with_text:
            item["texts"], item["keys"] = texts, keys
        return item


def make_loader(dataset: BatchDataset, start: int = 0, num_workers: int = 2, prefetch: int = 4,
                pin_memory: bool = False) -> DataLoader:
    """Batches ``start..len-1`` in order; workers take whole batches round-robin (order is deterministic)."""
    return DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=prefetch if num_workers > 0 else None,
                      persistent_workers=False)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch (non_blocking from pinned memory); features stay float16 on the wire.

    Keys ending in ``_host`` stay where they are: host copies the step reads without touching the device.
    """
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and not k.endswith("_host") else v)
            for k, v in batch.items()}
