"""``--loader dali``: NVIDIA DALI's webdataset reader over the same shards, features assembled on the GPU.

DALI reads each tar with the ``.idx`` files prep writes (the ``wds2idx`` format), shards samples across ranks
(``shard_id``/``num_shards``, padded so every rank gets the same number of batches), shuffles with its own seeded
buffer, and turns the ``.npy`` bytes into a padded float16 batch: the 128-byte npy header is sliced off, the rest
reinterpreted as float16 (frames, 80) and padded to a multiple of 64 frames, on the GPU. Transcripts come from the
json member and become label matrices on the host (a few microseconds per utterance).

What DALI cannot do here: length bucketing (batches have a fixed number of utterances; the padded length is the
batch's longest, rounded up to 64 frames) and dropping utterances inside the pipeline: rows longer than
``max_frames`` are emptied (length 0) and counted, never truncated. Resume is exact: the iterator's checkpoint is
saved with the model. On a CPU-only machine the pipeline runs with ``device_id=None`` (tests use that to check
it yields the same utterances as the WebDataset path); ``--loader dali`` for training requires a CUDA GPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lmu_asr import UserError
from lmu_asr.config import DataConfig
from lmu_asr.data.shards import ShardSet
from lmu_asr.prep.shards import NPY_HEADER
from lmu_asr.text import encode


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    """--loader dali needs the nvidia-dali package and a CUDA GPU; say which is missing in one line."""
    if not dali_available():
        raise UserError("--loader dali needs NVIDIA DALI: pip install 'lmu-asr[dali]' (nvidia-dali-cuda120)")
    if not torch.cuda.is_available():
        raise UserError("--loader dali decodes on the GPU and no CUDA device is available; use --loader wds")


def dali_batch_size(cfg: DataConfig) -> int:
    return cfg.batch_size if cfg.batch_size > 0 else max(1, cfg.batch_frames // cfg.max_frames)


class DaliSource:
    """Batches (the same dicts as ``BatchDataset``) from a DALI pipeline; iterate once per epoch."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, downsample: int, seed: int, rank: int = 0,
                 world: int = 1, device_id: int | None = None, shuffle: bool = True,
                 checkpoint: str | None = None, num_threads: int = 4) -> None:
        if shards.compressed:
            raise UserError("--loader dali reads uncompressed shards only (prep without --compress zstd)")
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        names = [n for n in shards.shard_names if n not in shards.damaged_shards]
        paths = [str(shards.directory / n) for n in names]
        index_paths = [str(shards.directory / n.replace(".tar", ".idx")) for n in names]
        self.cfg, self.downsample, self.batch_size = cfg, downsample, dali_batch_size(cfg)
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        n_utts = int(shards.usable.sum())
        self.batches_per_epoch = math.ceil(math.ceil(n_utts / world) / self.batch_size)

        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                      enable_checkpointing=True, prefetch_queue_depth=2)
        def pipeline():  # noqa: ANN202
            fbank, meta = fn.readers.webdataset(
                paths=paths, index_paths=index_paths, ext=["fbank.npy", "json"], name="reader",
                random_shuffle=shuffle, initial_fill=max(cfg.shuffle_buffer, 1), shard_id=rank, num_shards=world,
                pad_last_batch=True, missing_component_behavior="error", dtypes=[types.UINT8, types.UINT8])
            source = fn.pad(fn.get_property(fbank, key="source_info"), axes=[0])
            feats = fn.reshape(fn.reinterpret(fbank[NPY_HEADER:], dtype=types.FLOAT16), shape=[-1, 80])
            if device_id is not None:
                feats = feats.gpu()
            length = feats.shape()[0]
            return fn.pad(feats, axes=[0], align=64), length, fn.pad(meta, axes=[0]), source

        pipe = pipeline(checkpoint=checkpoint) if checkpoint else pipeline()
        self.iterator = DALIGenericIterator([pipe], ["feats", "length", "json", "source"], reader_name="reader",
                                            last_batch_policy=LastBatchPolicy.FILL, auto_reset=True)

    def checkpoint(self) -> str:
        return self.iterator.checkpoints()[0]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for k, out in enumerate(self.iterator):
            yield self._to_batch(out[0], k)

    def _to_batch(self, out: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
        feats, lengths = out["feats"], out["length"].reshape(-1).to(torch.int64).cpu()
        metas = [json.loads(bytes(row.cpu().numpy()).rstrip(b"\0")) for row in out["json"]]
        keys = [bytes(row.cpu().numpy()).rstrip(b"\0").decode().rsplit(":", 1)[-1].split(".")[0]
                for row in out["source"]]
        too_long = lengths > self.cfg.max_frames
        if too_long.any():  # emptied, never truncated: a cut utterance would keep its full transcript
            lengths = torch.where(too_long, torch.zeros_like(lengths), lengths)
        T = min(feats.shape[1], max(int(lengths.max()), 1))
        T = -(-T // self.downsample) * self.downsample
        feats = feats[:, :T]
        S = max(1, T // self.downsample)
        targets = np.zeros((len(metas), S), dtype=np.int64)
        target_lengths = np.zeros(len(metas), dtype=np.int64)
        for row, meta in enumerate(metas):
            ids = encode(meta["text"])
            if lengths[row] > 0 and len(ids) <= S:
                targets[row, : len(ids)] = ids
                target_lengths[row] = len(ids)
        return {"feats": feats, "lengths": lengths.to(feats.device), "lengths_host": lengths,
                "targets": torch.from_numpy(targets),
                "target_lengths": torch.from_numpy(target_lengths), "index": k,
                "real": int((lengths > 0).sum()), "skipped": int(too_long.sum()),
                "texts": [m["text"] for m in metas], "keys": keys}
