"""Validation and ``lmuasr eval``: CTC loss and WER/CER over a shard set, sharded across ranks when in DDP."""

from __future__ import annotations

import time
from typing import Any

import torch

from lmu_asr.config import Config
from lmu_asr.data.dataset import BatchDataset, make_loader, to_device
from lmu_asr.data.sampler import eval_plan
from lmu_asr.data.shards import ShardSet
from lmu_asr.model.asr import LMUASR, ctc_loss
from lmu_asr.model.decode import decode_texts
from lmu_asr.text import ErrorRates
from lmu_asr.train import dist


@torch.no_grad()
def evaluate(model: LMUASR, shards: ShardSet, cfg: Config, device: torch.device, beam: int = 0,
             autocast_dtype: torch.dtype | None = None, keep_hyps: bool = False) -> dict[str, Any]:
    """Loss (mean per label, as in training) and corpus WER/CER (GigaSpeech scoring) on every utterance."""
    was_training = model.training
    model.eval()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    batches, stats = eval_plan(shards, cfg.data, cfg.model.downsample, rank, world)
    loader = make_loader(BatchDataset(shards, batches, cfg.model.downsample, with_text=True),
                         num_workers=min(cfg.data.num_workers, 2), prefetch=2)
    rates = ErrorRates()
    loss_sum = utts = 0.0
    hyps: list[tuple[str, str, str]] = []
    t0 = time.perf_counter()
    for batch in loader:
        b = to_device(batch, device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits, out_lengths = model(b["feats"], b["lengths"])
        real = batch["real"]
        valid = b["target_lengths"] > 0
        if real:
            loss = ctc_loss(logits, out_lengths, b["targets"], b["target_lengths"])
            loss_sum += float(loss) * int(valid.sum())
            utts += int(valid.sum())
        texts = decode_texts(logits.float(), out_lengths, beam)
        for ref, hyp, key, n in zip(batch["texts"], texts, batch["keys"], batch["lengths"].tolist(), strict=False):
            if n == 0:
                continue
            rates.add(ref, hyp)
            if keep_hyps:
                hyps.append((key, ref, hyp))
    totals = dist.all_reduce_sum([loss_sum, utts, rates.word_errors, rates.ref_words, rates.char_errors,
                                  rates.ref_chars, rates.utterances], device)
    rates = ErrorRates(int(totals[2]), int(totals[3]), int(totals[4]), int(totals[5]), int(totals[6]))
    model.train(was_training)
    out = {"loss": totals[0] / max(totals[1], 1), **rates.as_dict(), "skipped": stats.skipped,
           "seconds": time.perf_counter() - t0, "beam": beam}
    if keep_hyps:
        gathered = dist.all_gather_objects(hyps)
        out["hypotheses"] = sorted(h for part in gathered for h in part)  # type: ignore[union-attr]
    return out
