"""Epoch plans: which utterances form which batch, computed from the index alone, deterministically.

A plan depends only on (index, config, seed, epoch, rank, world), never on what was read before, which is what
makes resume exact and cheap: the trainer recomputes the epoch's plan and starts at batch *k*; nothing is
replayed. The plan mirrors a WebDataset pipeline:

1. shards are shuffled per epoch (seeded) and concatenated into one stream in file order;
2. the stream is cut into ``world`` contiguous pieces of equal *frames*, one per rank: every rank reads mostly
   whole shards (sequential I/O) and gets the same amount of audio, whatever the shard count, so an odd number
   of shards can never leave a rank idle or hang a collective;
3. each rank's piece goes through a seeded shuffle buffer (emulated on indices);
4. utterances are bucketed by length: a batch holds utterances of one bucket, padded to the bucket's length, and
   the number of rows per bucket is fixed (``batch_frames // bucket`` or ``batch_size``), so ``torch.compile``
   sees one static shape per bucket; the partial batch a bucket is left with at the end of an epoch is filled
   with empty rows (length 0) up to the bucket's rows (``partial_batches="full"``: no extra shape; the cost is
   one padded batch per bucket per epoch) or up to a power of two (``"pow2"``, for eager CPU runs).

Utterances are skipped (and counted) when longer than ``max_frames`` (never truncated: that would leave the full
transcript on a cut utterance), shorter than ``min_frames``, or too short for their transcript under CTC.
DataLoader workers then take whole batches, so the rank -> worker split is at batch granularity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmu_asr.config import DataConfig
from lmu_asr.data.shards import OPEN_DAMAGE, ShardSet


@dataclass
class Batch:
    bucket: int  # padded length in frames
    capacity: int  # rows (static per bucket)
    indices: np.ndarray  # utterance indices; rows past len(indices) are empty

    @property
    def real(self) -> int:
        return len(self.indices)


@dataclass
class PlanStats:
    utterances: int = 0
    frames: int = 0
    padded_frames: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.frames / max(self.padded_frames, 1)


def bucket_lengths(cfg: DataConfig, downsample: int) -> list[int]:
    """The configured buckets up to max_frames, plus max_frames itself (rounded up to the stride) if needed."""
    top = -(-cfg.max_frames // downsample) * downsample
    buckets = [b for b in cfg.buckets if b < top]
    return buckets + [top]


def capacity(cfg: DataConfig, bucket: int) -> int:
    return cfg.batch_size if cfg.batch_size > 0 else max(1, cfg.batch_frames // bucket)


def planned_shapes(cfg: DataConfig, downsample: int, num_frames: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Every (rows, padded frames) a training batch can have: what torch.compile is warmed up on.

    ``num_frames`` (the eligible utterances' lengths): only the buckets some utterance falls into, which is the
    same set in every epoch and on every rank, whatever the shuffling. One shape per bucket with
    ``partial_batches="full"``; with ``"pow2"`` the partial batches add the powers of two below a bucket's rows
    (they depend on the epoch's tail, so they cannot all be known: that mode is for eager runs).
    """
    buckets = bucket_lengths(cfg, downsample)
    if num_frames is not None:
        used = np.unique(np.searchsorted(buckets, num_frames, side="left"))
        buckets = [buckets[i] for i in used.tolist() if i < len(buckets)]
    shapes = []
    for bucket in buckets:
        rows = capacity(cfg, bucket)
        shapes.append((rows, bucket))
        if cfg.partial_batches == "pow2":
            shapes += [(1 << k, bucket) for k in range(rows.bit_length()) if 1 << k < rows]
    return sorted(set(shapes), key=lambda s: (s[1], s[0]))


def eligible(shards: ShardSet, cfg: DataConfig, downsample: int) -> tuple[np.ndarray, dict[str, int]]:
    """Mask of utterances that can be trained on, and why the others cannot."""
    n = shards.num_frames
    out_frames = -(-n // downsample)
    reasons = {name: shards.damage == code for code, name in OPEN_DAMAGE.items()}
    reasons |= {
        "longer_than_max_frames": n > cfg.max_frames,
        "shorter_than_min_frames": n < cfg.min_frames,
        "transcript_too_long_for_ctc": shards.min_out_frames > out_frames,
    }
    mask = np.ones(len(n), dtype=bool)
    skipped = {}
    for reason, bad in reasons.items():
        count = int((bad & mask).sum())
        if count:
            skipped[reason] = count
        mask &= ~bad
    return mask, skipped


def shuffle_buffer(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """What a streaming shuffle buffer of ``size`` emits for this input order (seeded), without a Python loop.

    The buffer starts with the first ``size`` items; each next item replaces a uniformly drawn slot, whose
    occupant is emitted; at the end the buffer is emitted in a random order. The item emitted at step k is
    therefore the last one written into slot ``picks[k]`` before step k, or the slot's first item: found for
    every k at once by grouping the steps by slot (a stable sort keeps each group in time order).
    """
    if size <= 1 or len(items) <= 1:
        return items.copy()
    size = min(size, len(items))
    n = len(items) - size
    picks = rng.integers(0, size, n)
    by_slot = np.argsort(picks, kind="stable")
    same = picks[by_slot[1:]] == picks[by_slot[:-1]]
    previous = np.full(n, -1, dtype=np.int64)  # the step that last wrote the slot step k reads
    previous[by_slot[1:][same]] = by_slot[:-1][same]
    out = np.empty(len(items), dtype=items.dtype)
    out[:n] = items[np.where(previous >= 0, size + previous, picks)]
    last = np.full(size, -1, dtype=np.int64)  # the step that wrote each slot last
    if n:
        ends = np.r_[~same, True]
        last[picks[by_slot[ends]]] = by_slot[ends]
    buf = items[np.where(last >= 0, size + last, np.arange(size))]
    out[n:] = buf[rng.permutation(size)]
    return out


def rank_stream(shards: ShardSet, mask: np.ndarray, epoch: int, seed: int, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous, equal-frames piece of the epoch's shard-shuffled stream."""
    rng = np.random.default_rng([seed, epoch])
    shard_rank = np.empty(len(shards.shard_names), dtype=np.int64)
    shard_rank[rng.permutation(len(shards.shard_names))] = np.arange(len(shards.shard_names))
    order = np.lexsort((shards.position, shard_rank[shards.shard_id]))
    stream = order[mask[order]]
    if world == 1 or len(stream) == 0:
        return stream
    frames = shards.num_frames[stream].astype(np.float64)
    mid = np.cumsum(frames) - frames / 2
    owner = np.minimum((mid * world / frames.sum()).astype(np.int64), world - 1)
    return stream[owner == rank]


def make_batches(order: np.ndarray, shards: ShardSet, cfg: DataConfig, downsample: int,
                 stats: PlanStats) -> list[Batch]:
    """Batches of one bucket each, in the order a streaming bucketer would emit them (no Python loop per item).

    Walking the stream, a bucket's batch is emitted when its last row arrives: so the full batches of every
    bucket are consecutive groups of its items, emitted in the order of their last items' stream positions;
    the partial batches follow, bucket by bucket.
    """
    buckets = bucket_lengths(cfg, downsample)
    which = np.searchsorted(buckets, shards.num_frames[order], side="left")
    full: list[tuple[int, Batch]] = []
    partial: list[Batch] = []
    for b, bucket in enumerate(buckets):
        pos = np.flatnonzero(which == b)
        if not len(pos):
            continue
        rows = capacity(cfg, bucket)
        members = order[pos]
        n_full = len(pos) // rows
        for j in range(n_full):
            full.append((int(pos[(j + 1) * rows - 1]), Batch(bucket, rows, members[j * rows:(j + 1) * rows])))
        rest = members[n_full * rows:]
        if len(rest):
            if cfg.partial_batches == "pow2":
                rows = min(rows, 1 << (len(rest) - 1).bit_length())
            partial.append(Batch(bucket, rows, rest))
    full.sort(key=lambda item: item[0])
    batches = [b for _, b in full] + partial
    stats.utterances += len(order)
    stats.frames += int(shards.num_frames[order].sum())
    stats.padded_frames += sum(b.bucket * b.capacity for b in batches)
    return batches


def epoch_plan(shards: ShardSet, cfg: DataConfig, downsample: int, epoch: int, seed: int, rank: int = 0,
               world: int = 1) -> tuple[list[Batch], PlanStats]:
    """This rank's batches for one training epoch (callers equalise the count across ranks)."""
    mask, skipped = eligible(shards, cfg, downsample)
    stats = PlanStats(skipped=skipped)
    mine = rank_stream(shards, mask, epoch, seed, rank, world)
    order = shuffle_buffer(mine, cfg.shuffle_buffer, np.random.default_rng([seed, epoch, rank, 1]))
    return make_batches(order, shards, cfg, downsample, stats), stats


def eval_plan(shards: ShardSet, cfg: DataConfig, downsample: int, rank: int = 0,
              world: int = 1) -> tuple[list[Batch], PlanStats]:
    """Evaluation: every readable utterance once, sorted by length (least padding), strided across ranks.

    Evaluation must score everything it can read: utterances longer than max_frames go into extra buckets, and
    utterances too short for training (or for their transcript under CTC) are scored too (as the errors they will
    be). Only utterances found damaged when the set was opened are left out, counted by reason.
    """
    eval_cfg, stats = eval_setup(shards, cfg)
    order = np.flatnonzero(shards.usable)
    order = order[np.argsort(shards.num_frames[order], kind="stable")][rank::world]
    return make_batches(order, shards, eval_cfg, downsample, stats), stats


def eval_setup(shards: ShardSet, cfg: DataConfig) -> tuple[DataConfig, PlanStats]:
    """The batching config of an evaluation (buckets up to the longest utterance, no minimum length) and its
    stats, holding what was found damaged when the set was opened (the only utterances left out)."""
    longest = int(shards.num_frames[shards.usable].max()) if shards.usable.any() else cfg.max_frames
    eval_cfg = DataConfig(**{**cfg.__dict__, "max_frames": max(cfg.max_frames, longest), "min_frames": 0})
    return eval_cfg, PlanStats(skipped=shards.damage_counts())
