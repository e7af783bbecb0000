"""Validation and ``lmuasr eval``: CTC loss and WER/CER over a shard set, sharded across ranks when in DDP.

Nothing is silently left out: every utterance the index lists is scored unless it cannot be read, and those are
counted by reason (with the first keys) in the result's ``damaged``; a set with nothing readable raises
:class:`NothingToScore` instead of reporting a perfect score over zero utterances.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lmu_asr import UserError
from lmu_asr.config import Config
from lmu_asr.data.dataset import BatchDataset, make_loader, to_device
from lmu_asr.data.sampler import eval_plan
from lmu_asr.data.shards import OPEN_DAMAGE, ShardSet
from lmu_asr.data.stream import RemoteShards, eval_stream_loader
from lmu_asr.model.asr import LMUASR, ctc_loss
from lmu_asr.model.decode import decode_texts
from lmu_asr.text import ErrorRates
from lmu_asr.train import dist

log = logging.getLogger(__name__)

MAX_EXAMPLES = 20


class NothingToScore(UserError):
    """An evaluation set without a single readable utterance."""


def ctc_feasible(out_lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """Rows whose transcript fits their output frames under CTC (labels + adjacent repeats <= frames)."""
    pos = torch.arange(targets.shape[1] - 1, device=targets.device)[None, :]
    repeats = ((targets[:, 1:] == targets[:, :-1]) & (pos < target_lengths[:, None] - 1)).sum(1)
    return (target_lengths > 0) & (target_lengths + repeats <= out_lengths)


def dev_record(res: dict[str, Any], epoch: int, step: int) -> dict[str, Any]:
    """The ``eval.jsonl`` record of one epoch's validation; logs its scores and any unreadable utterances (a
    user must see that part of DEV went unscored, not find a WER over fewer utterances than planned)."""
    record = {"epoch": epoch, "step": step, "dev_loss": res["loss"], "dev_wer": res["wer"], "dev_cer": res["cer"],
              "utterances": res["utterances"]}
    if res["damaged"]["count"]:
        record["unreadable"] = res["damaged"]["count"]
        log.warning("dev: %d utterance(s) unreadable and not scored: %s", res["damaged"]["count"],
                    res["damaged"]["by_reason"])
    log.info("epoch %d: dev loss %.4f, WER %.2f %%, CER %.2f %%", epoch, res["loss"], 100 * res["wer"],
             100 * res["cer"])
    return record


def damage_summary(counts: Counter, examples: list[dict]) -> dict[str, Any]:
    return {"count": sum(counts.values()), "by_reason": dict(sorted(counts.items())), "examples": examples}


def decode_one(log_probs: np.ndarray, decoder: Callable[[np.ndarray], str] | None, beam: int = 0) -> str:
    """One utterance's collected (T, 29) log-probs -> text: ``decoder`` (an LM search) if given, else what
    ``evaluate`` decodes without one (greedy, or prefix beam search when ``beam`` > 1)."""
    if decoder is not None:
        return decoder(log_probs)
    return decode_texts(torch.from_numpy(log_probs)[None], torch.tensor([len(log_probs)]), beam)[0]


@torch.no_grad()
def evaluate(model: LMUASR, shards: ShardSet, cfg: Config, device: torch.device, beam: int = 0,
             autocast_dtype: torch.dtype | None = None, keep_hyps: bool = False,
             decoder: Callable[[np.ndarray], str] | None = None,
             collect: list[tuple[str, str, np.ndarray]] | None = None,
             remote: RemoteShards | None = None) -> dict[str, Any]:
    """Loss (mean per label, as in training) and corpus WER/CER (GigaSpeech scoring) on every readable utterance.

    ``decoder``: log-probs (T, 29) of one utterance -> text (e.g. a ``WordDecoder``'s LM beam search) instead of
    greedy / prefix beam. ``collect``: receives (key, reference, log-probs) of every scored utterance (LM tuning
    decodes them many times without running the model again). ``remote``: the set's shards are URLs (``shards``
    is their fetched index, from ``data.stream.open_shards``), streamed instead of read by random access.
    """
    was_training = model.training
    model.eval()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if remote is not None:
        loader, stats = eval_stream_loader(shards, remote, cfg.data, cfg.model.downsample, rank, world)
    else:
        batches, stats = eval_plan(shards, cfg.data, cfg.model.downsample, rank, world)
        loader = make_loader(BatchDataset(shards, batches, cfg.model.downsample, with_text=True),
                             num_workers=min(cfg.data.num_workers, 2), prefetch=2)
    rates = ErrorRates()
    loss_sum = utts = 0.0
    hyps: list[tuple[str, str, str]] = []
    damaged: Counter = Counter(stats.skipped if rank == 0 else {})
    examples: list[dict] = [{"key": shards.key(int(i)), "reason": OPEN_DAMAGE[int(shards.damage[i])]}
                            for i in np.flatnonzero(shards.damage > 0)[:MAX_EXAMPLES]] if rank == 0 else []
    t0 = time.perf_counter()
    for batch in loader:
        for d in batch["damaged"]:
            damaged[d["reason"]] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(d)
        bad_keys = {d["key"] for d in batch["damaged"]}
        b = to_device(batch, device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits, out_lengths = model(b["feats"], b["lengths"])
        feasible = ctc_feasible(out_lengths, b["targets"], b["target_lengths"])
        n_feasible = int(feasible.sum())
        if n_feasible:
            tl = torch.where(feasible, b["target_lengths"], torch.zeros_like(b["target_lengths"]))
            loss = ctc_loss(logits, out_lengths, b["targets"], tl)
            loss_sum += float(loss) * n_feasible
            utts += n_feasible
        if decoder is not None or collect is not None:
            log_probs = [lp[:n].cpu().numpy() for lp, n in zip(logits.float().log_softmax(-1)[: batch["real"] +
                         len(bad_keys)], out_lengths.tolist(), strict=False)]
        texts = [decoder(lp) for lp in log_probs] if decoder is not None else \
            decode_texts(logits.float(), out_lengths, beam)
        for row, (ref, hyp, key) in enumerate(zip(batch["texts"], texts, batch["keys"], strict=False)):  # real rows
            if key in bad_keys:
                continue
            if collect is not None:
                collect.append((key, ref, log_probs[row]))
            rates.add(ref, hyp)
            if keep_hyps:
                hyps.append((key, ref, hyp))
    totals = dist.all_reduce_sum([loss_sum, utts, rates.word_errors, rates.ref_words, rates.char_errors,
                                  rates.ref_chars, rates.utterances], device)
    rates = ErrorRates(int(totals[2]), int(totals[3]), int(totals[4]), int(totals[5]), int(totals[6]))
    model.train(was_training)
    if world > 1:  # every rank takes part in the gather; the counts are the sum over ranks
        parts = dist.all_gather_objects(dict(damaged))
        damaged = Counter()
        for part in parts:
            damaged.update(part)  # type: ignore[arg-type]
    if rates.utterances == 0:
        what = ", ".join(f"{k} {v}" for k, v in sorted(damaged.items())) or "the index lists none"
        raise NothingToScore(f"no readable utterance to score in {shards.directory} ({len(shards)} in its index; "
                             f"unreadable: {what})")
    out = {"loss": totals[0] / max(totals[1], 1), **rates.as_dict(), "damaged": damage_summary(damaged, examples),
           "index_utterances": len(shards), "seconds": time.perf_counter() - t0, "beam": beam}
    if keep_hyps:
        gathered = dist.all_gather_objects(hyps)
        out["hypotheses"] = sorted(h for part in gathered for h in part)  # type: ignore[union-attr]
    return out


def evaluate_vtln(model: LMUASR, shards: ShardSet, cfg: Config, device: torch.device, warps: Sequence[float],
                  decoders: dict[str, Callable[[np.ndarray], str] | None], band_edge_hz: float | None = None,
                  beam: int = 0) -> dict[str, dict[str, Any]]:
    """Speaker-level test-time VTLN (``lmu_asr.model.vtln``): the set decoded under every warp, one warp chosen per
    speaker from the posteriors alone, then each decoder scored on the chosen warp's log-probs.

    ``decoders``: name -> log-probs (T, 29) -> text, or None for what ``evaluate`` does without one (greedy, or
    prefix beam search when ``beam`` > 1). Returns ``{name + "+vtln": {wer, cer, ..., "hypotheses", "warps":
    {speaker: alpha}}}`` per decoder. The model runs ``len(warps)`` times over the set; decoding runs once per
    decoder.
    """
    from lmu_asr.model.vtln import Warped, choose_warps, warp_matrix

    feats = shards.meta.get("features", {})
    runs: dict[float, list[tuple[str, str, np.ndarray]]] = {}
    base: dict[str, Any] = {}
    for alpha in warps:
        matrix = warp_matrix(alpha, band_edge_hz, int(feats.get("num_mel_bins", 80)),
                             int(feats.get("sample_rate", 16000)))
        runs[alpha] = []
        res = evaluate(Warped(model, matrix), shards, cfg, device, collect=runs[alpha])
        if alpha == 1.0 or not base:  # the unwarped run's loss and damage counts stand for the set
            base = {k: res[k] for k in ("loss", "damaged", "index_utterances")}
    speaker_of = shards.speakers()
    chosen = choose_warps({a: [(k, lp) for k, _, lp in rows] for a, rows in runs.items()}, speaker_of)
    by_key = {a: {k: (ref, lp) for k, ref, lp in rows} for a, rows in runs.items()}
    keys = sorted(by_key[warps[0]])
    out = {}
    for name, decode in decoders.items():
        rates, hyps = ErrorRates(), []
        for key in keys:
            ref, lp = by_key[chosen[speaker_of.get(key, "")]][key]
            hyp = decode_one(lp, decode, beam)
            rates.add(ref, hyp)
            hyps.append((key, ref, hyp))
        out[f"{name}+vtln"] = {**base, **rates.as_dict(), "hypotheses": hyps, "beam": beam,
                               "warps": dict(sorted(chosen.items())), "band_edge_hz": band_edge_hz}
    return out
