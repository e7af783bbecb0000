"""``lmuasr adapt``: unsupervised adaptation to new voices by iterative pseudo-labelling.

A model trained on a few voices misreads an unheard one in ways of its own (FSDD: george's TWO as FOUR, nicolas's
TWO/THREE swaps), and no training-time lever screened so far fixed that without costing another voice. What the
unheard voice's own recordings can teach without any transcript: decode them (with the word LM where there is one),
keep the hypotheses the model is most confident of, fine-tune on those together with labelled training utterances
(so the model keeps what it knew), and decode again; a few rounds. The kept share matters: fine-tuning on every
hypothesis teaches the model its own LM output and changes nothing with the LM (measured on theo: 10.2 -> 10.2 %
after two rounds), while the most confident 60 % carry the voice's sound into the uncertain rest.

Nothing here reads the adapted set's transcripts: hypotheses come from the log-probs alone (``evaluate`` is asked
only to ``collect`` them), so a shard folder of a test set can be adapted to and still be scored honestly as
unlabelled-audio adaptation. The whole set is held in memory (features of 10 h of audio: about 0.6 GB).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmu_asr import UserError
from lmu_asr.config import Config
from lmu_asr.data.shards import ShardError, ShardSet
from lmu_asr.data.specaug import SpecAugment
from lmu_asr.model.asr import LMUASR, ctc_loss
from lmu_asr.text import encode
from lmu_asr.train.checkpoint import checkpoint_payload, load
from lmu_asr.train.evaluate import ctc_feasible, decode_one, evaluate

log = logging.getLogger(__name__)


@dataclass
class AdaptOptions:
    """Measured on FSDD's five voices, each held out in turn, two seeds (README): 3 rounds of 5 epochs at lr 1e-4,
    the most confident 60 % kept, three labelled utterances per pseudo-labelled one. 3 epochs at lr 3e-4 gained
    nearly as much on average (LM 12.6 against 11.9 %) but moved a voice by 8 points between seeds (jackson 0.8 /
    8.6 %)."""

    rounds: int = 3
    epochs: int = 5
    keep: float = 0.6  # share of the hypotheses kept each round, most confident first
    lr: float = 1e-4
    labelled_ratio: float = 3.0  # labelled training utterances drawn per pseudo-labelled one, each epoch
    batch_frames: int = 3000
    seed: int = 0

    def check(self) -> None:
        if self.rounds < 1 or self.epochs < 1:
            raise UserError("adapt: --rounds and --epochs must be >= 1")
        if not 0 < self.keep <= 1:
            raise UserError(f"adapt: --keep must lie in (0, 1], got {self.keep:g}")
        if self.lr <= 0 or self.labelled_ratio < 0 or self.batch_frames < 1:
            raise UserError("adapt: --lr and --batch-frames must be > 0, --labelled-ratio >= 0")


def confidence(log_probs: np.ndarray) -> float:
    """Mean over frames of the best symbol's log-probability: high where the model is sure of every frame."""
    return float(log_probs.max(-1).mean()) if len(log_probs) else float("-inf")


def pseudo_labels(model: LMUASR, shards: ShardSet, cfg: Config, device: torch.device,
                  decoder: Callable[[np.ndarray], str] | None, beam: int = 0) -> list[tuple[str, str, float]]:
    """(key, hypothesis, confidence) of every readable utterance, decoded from the log-probs alone."""
    rows: list[tuple[str, str, np.ndarray]] = []
    evaluate(model, shards, cfg, device, collect=rows)
    out = []
    for key, _reference, lp in rows:  # the reference is never looked at
        out.append((key, " ".join(decode_one(lp, decoder, beam).split()), confidence(lp)))
    return out


def frame_batches(lengths: list[int], batch_frames: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length under a padded-frame budget, in random order (lengths jittered so that
    equal-length utterances do not always share a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] + rng.random() * 20)
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        if cur and grown * (len(cur) + 1) > batch_frames:
            batches.append(cur)
            cur, grown = [], lengths[i]
        cur.append(i)
        longest = grown
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(items: list[tuple[np.ndarray, list[int]]], downsample: int) -> tuple[torch.Tensor, ...]:
    frames = max(len(x) for x, _ in items)
    frames += (-frames) % downsample
    feats = torch.zeros(len(items), frames, items[0][0].shape[1])
    targets = torch.zeros(len(items), max(len(ids) for _, ids in items), dtype=torch.long)
    for row, (x, ids) in enumerate(items):
        feats[row, : len(x)] = torch.from_numpy(x.astype(np.float32))
        targets[row, : len(ids)] = torch.tensor(ids)
    return (feats, torch.tensor([len(x) for x, _ in items]), targets,
            torch.tensor([len(ids) for _, ids in items]))


def fine_tune(model: LMUASR, pseudo: list[tuple[np.ndarray, list[int]]], cfg: Config, device: torch.device,
              opts: AdaptOptions, rng: random.Random, labelled: ShardSet | None = None) -> dict[str, float]:
    """One pass per epoch over ``pseudo`` (features, label ids) plus ``labelled_ratio`` times as many labelled
    utterances, drawn afresh each epoch: AdamW, gradient clipping, SpecAugment on."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    model.train()
    loss_sum, steps, utts, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
    n_labelled = round(len(pseudo) * opts.labelled_ratio) if labelled is not None else 0
    for _ in range(opts.epochs):
        items = pseudo + (labelled_draw(labelled, n_labelled, rng) if n_labelled else [])
        for batch in frame_batches([len(x) for x, _ in items], opts.batch_frames, rng):
            feats, lengths, targets, target_lengths = (t.to(device) for t in collate([items[i] for i in batch],
                                                                                     cfg.model.downsample))
            logits, out_lengths = model(feats, lengths)
            # a row its frames cannot spell (a long labelled transcript, a tempo-shortened one) gets target length
            # 0, which ctc_loss leaves out; no test of it on the host, so no sync per step
            ok = ctc_feasible(out_lengths, targets, target_lengths)
            loss = ctc_loss(logits, out_lengths, targets, torch.where(ok, target_lengths, 0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
            loss_sum += loss.detach()  # read once at the end: no host sync per step
            steps += 1
            utts += len(batch)
    model.eval()
    return {"loss": float(loss_sum) / steps if steps else float("nan"),
            "utt_per_s": utts / max(time.perf_counter() - t0, 1e-9), "utterances_per_epoch": utts // opts.epochs}


def read_features(shards: ShardSet) -> tuple[dict[str, np.ndarray], int]:
    """key -> features of every readable utterance; damaged ones are counted and logged, not raised."""
    out, damaged = {}, 0
    for i, key in enumerate(shards.key_list()):
        try:
            out[key] = shards.read(i)[0]
        except ShardError as err:
            damaged += 1
            log.warning("adapt: skipping an unreadable utterance: %s", err)
    return out, damaged


def labelled_draw(shards: ShardSet, n: int, rng: random.Random) -> list[tuple[np.ndarray, list[int]]]:
    """``n`` readable labelled utterances drawn at random (damaged or unspellable ones skipped)."""
    out: list[tuple[np.ndarray, list[int]]] = []
    candidates = [i for i in range(len(shards)) if not shards.damage[i]]
    for i in rng.sample(candidates, min(n, len(candidates))):
        try:
            feats, text = shards.read(i)
            out.append((feats, encode(text)))
        except (ShardError, ValueError) as err:
            log.warning("adapt: skipping a labelled utterance: %s", err)
    return out


def adapt(model: LMUASR, cfg: Config, target: ShardSet, device: torch.device, opts: AdaptOptions,
          words: Any = None, beam: int = 0, labelled: ShardSet | None = None, progress: bool = True) -> dict[str, Any]:
    """Adapt ``model`` (in place; left in eval mode) to the voices of ``target``, whose transcripts are never read.

    ``words``: a ``WordDecoder`` for the pseudo-labels (else greedy, or prefix beam ``beam``). Returns the report:
    the options, the decoder, and per round how many hypotheses were kept, the least confidence kept, the
    fine-tuning loss and speed."""
    opts.check()
    t0 = time.perf_counter()
    rng = random.Random(opts.seed)
    torch.manual_seed(opts.seed)  # dropout and SpecAugment draw from the global generator
    feats, damaged = read_features(target)
    if not feats:
        raise UserError(f"adapt: no readable utterance in {target.directory}")
    augment = model.augment
    model.augment = augment or SpecAugment(cfg.data.specaug).to(device)  # a checkpoint's model comes without
    decode = words.decode if words is not None else None
    rounds = []
    try:
        for r in range(1, opts.rounds + 1):
            rounds.append(_round(model, cfg, target, device, opts, feats, decode, beam, labelled, rng))
            if progress:
                rec = rounds[-1]
                print(f"   adapt round {r}/{opts.rounds}: kept {rec['kept']} of {rec['hypotheses']} hypotheses, "
                      f"{rec['utterances_per_epoch']} utterances x {opts.epochs} epochs, loss {rec['loss']:.3f}, "
                      f"{rec['utt_per_s']:.0f} utt/s", flush=True)
    finally:
        model.augment = augment
        model.eval()
    if damaged:
        log.warning("adapt: %d unreadable utterance(s) of %s skipped", damaged, target.directory)
    label = words.opts.label() if words is not None else (f"beam{beam}" if beam > 1 else "greedy")
    return {"options": asdict(opts), "decoder": label, "utterances": len(feats), "unreadable": damaged,
            "rounds": rounds, "seconds": time.perf_counter() - t0}


def _round(model: LMUASR, cfg: Config, target: ShardSet, device: torch.device, opts: AdaptOptions,
           feats: dict[str, np.ndarray], decode: Callable[[np.ndarray], str] | None, beam: int,
           labelled: ShardSet | None, rng: random.Random) -> dict[str, Any]:
    """Decode the set, keep the most confident hypotheses, fine-tune on them (and on labelled utterances)."""
    t0 = time.perf_counter()
    hyps = [h for h in pseudo_labels(model, target, cfg, device, decode, beam) if h[1] and h[0] in feats]
    hyps.sort(key=lambda h: -h[2])
    kept = hyps[: max(1, round(len(hyps) * opts.keep))]
    if not kept:
        raise UserError("adapt: the model hears nothing but silence in every utterance; nothing to adapt to")
    stats = fine_tune(model, [(feats[k], encode(text)) for k, text, _ in kept], cfg, device, opts, rng, labelled)
    return {"hypotheses": len(hyps), "kept": len(kept), "min_confidence": kept[-1][2],
            **stats, "seconds": time.perf_counter() - t0}


def adapted_payload(model: LMUASR, cfg: Config, source: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The adapted checkpoint: the source's step and epoch (as ``lmuasr average`` keeps them), where it came from,
    and the adaptation's report."""
    state = load(source)
    return checkpoint_payload(model, cfg, adapt=report, adapted_from=str(source), step=state.get("step"),
                              epoch=state.get("epoch"))
