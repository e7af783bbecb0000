"""``lmuasr train``: shard loader -> compiled LMU-attention CTC model under DDP, with exact resume.

The hot path has no host synchronisation: a non-finite step is skipped on the device (fused AdamW's ``found_inf``,
or the GradScaler for fp16), and each step's loss is read one step late, after the next step is queued. Exact
resume rests on three things: the epoch plan is a pure function of (seed, epoch, rank); the global RNG is reseeded
from (seed, step, rank) before every step (dropout, SpecAugment); and the checkpoint holds model, optimiser,
scheduler, scaler and counters. The LR schedule spans ``epochs`` (or ``optim.total_steps``); ``--max-steps`` only
stops early, so ``--max-steps 4`` + ``--resume --max-steps 8`` equals one ``--max-steps 8`` run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmu_asr import UserError
from lmu_asr.config import Config
from lmu_asr.data.dataset import BatchDataset, PlanSampler, make_loader
from lmu_asr.data.sampler import capacity, eligible, epoch_plan, planned_shapes
from lmu_asr.data.shards import OPEN_DAMAGE
from lmu_asr.data.specaug import SpecAugment
from lmu_asr.data.stream import interleave, is_url, open_shards, stream_loader, stream_plan
from lmu_asr.fileio import atomic_write, check_writable
from lmu_asr.model.asr import LMUASR
from lmu_asr.train import checkpoint as ckpt
from lmu_asr.train import dist
from lmu_asr.train.describe import describe
from lmu_asr.train.evaluate import dev_record, evaluate
from lmu_asr.train.metrics import DeviceMonitor, JsonlLog, TensorBoard, Throughput, read_jsonl
from lmu_asr.train.step import MetricReader, StepRunner, step_record, step_seed

log = logging.getLogger(__name__)


class TrainingStopped(UserError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why."""


class Trainer:
    def __init__(self, cfg: Config, shards_dir: Path | str, run_dir: Path, dev_dir: Path | str | None = None,
                 resume: bool = False, device: str = "auto", debug: bool = False, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.debug, self.progress = cfg, Path(run_dir), debug, progress
        if debug:
            cfg.train.max_steps = min(cfg.train.max_steps or 3, 3)
            cfg.train.compile = "off"
        if cfg.train.loader == "dali":
            from lmu_asr.data.dali import require_dali

            require_dali()
        self.info = dist.detect()
        self.device = dist.select_device(self.info, device)
        if is_url(shards_dir) and cfg.train.loader == "dali":  # refused before anything is fetched
            raise UserError("--loader dali reads local shards; URL shards stream with --loader wds")
        # URLs are streamed with webdataset (lmu_asr.data.stream); their index is fetched
        self.shards, self.remote = open_shards(shards_dir)
        self.dev, self.dev_remote = open_shards(dev_dir) if dev_dir is not None else (None, None)
        self.dev_name = str(dev_dir) if self.dev_remote else str(self.dev.directory) if self.dev else ""
        torch.manual_seed(cfg.train.seed)  # the initial weights are part of the run's identity
        self.model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug), max_frames=cfg.data.max_frames)
        self.model.set_normalization(*self.shards.stats())
        self.step = self.epoch = self.batch_in_epoch = 0
        self.bad_streak = self.bad_total = self.run_utts = 0
        self.damaged_keys: set[str] = set()
        self.dev_unreadable = 0  # samples found unreadable (at open or when read), for the summary
        self.best_wer = self.best_loss = math.inf
        self.resume = resume
        self._stop_signal: int | None = None
        self.dali = None

    # ------------------------------------------------------------------ planning
    def _dali(self, checkpoint: str | None = None):  # noqa: ANN202
        from lmu_asr.data.dali import DaliSource

        return DaliSource(self.shards, self.cfg.data, self.cfg.model.downsample, self.cfg.train.seed,
                          self.info.rank, self.info.world_size, self.device.index, checkpoint=checkpoint)

    def epoch_batches(self, epoch: int) -> tuple[list, Any]:
        if self.remote is not None:  # the merged order of the workers' streams
            plans, _, stats = stream_plan(self.shards, self.cfg.data, self.cfg.model.downsample, epoch,
                                          self.cfg.train.seed, self.info.rank, self.info.world_size,
                                          self.cfg.data.num_workers)
            batches = [plans[w][k] for w, k in interleave(plans)]
        else:
            batches, stats = epoch_plan(self.shards, self.cfg.data, self.cfg.model.downsample, epoch,
                                        self.cfg.train.seed, self.info.rank, self.info.world_size)
        n = dist.all_reduce_min(len(batches), self.device)  # same step count on every rank: no hang
        n -= n % self.cfg.optim.grad_accum
        return batches[:n], stats

    def describe(self) -> str:
        """The --dry-run report (lmu_asr.train.describe)."""
        return describe(self)

    def planned(self) -> list[tuple[int, int]]:
        """The batch shapes of this run: one per bucket that holds an eligible utterance (see planned_shapes)."""
        mask, _ = eligible(self.shards, self.cfg.data, self.cfg.model.downsample)
        return planned_shapes(self.cfg.data, self.cfg.model.downsample, self.shards.num_frames[mask])

    # ------------------------------------------------------------------ state
    def _payload(self) -> dict[str, Any]:
        return ckpt.checkpoint_payload(
            self.model, self.cfg, **self.runner.state_dict(), step=self.step, epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch, bad_streak=self.bad_streak, bad_total=self.bad_total,
            best_wer=self.best_wer, best_loss=self.best_loss, world_size=self.info.world_size,
            dali=self.dali.checkpoint() if self.dali is not None else None)

    def _save_last(self) -> None:
        self._flush()
        if self.info.is_main:
            ckpt.atomic_save(self._payload(), self.run_dir / "checkpoints" / "last.pt")

    def _restore(self) -> None:
        path = self.run_dir / "checkpoints" / "last.pt"
        state = ckpt.load(path)
        old = state["config"]
        for section in ("model", "data", "optim"):
            if old[section] != asdict(getattr(self.cfg, section)):
                diff = [k for k in old[section] if old[section][k] != asdict(getattr(self.cfg, section)).get(k)]
                raise UserError(f"--resume: the {section} config differs from the checkpoint's in "
                                f"{', '.join(f'{section}.{k}' for k in diff)}; resume with the same settings")
        if state.get("world_size", 1) != self.info.world_size:
            raise UserError(f"--resume: the checkpoint was written by {state['world_size']} process(es), this run "
                            f"has {self.info.world_size}; the data plan depends on it")
        self.model.load_state_dict(state["model"])
        self.runner.load_state_dict(state)
        ckpt.set_rng_state(state["rng"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.bad_streak, self.bad_total, self.best_wer = state["bad_streak"], state["bad_total"], state["best_wer"]
        self.best_loss = state.get("best_loss", math.inf)
        if self.dali is not None:
            self.dali = self._dali(state.get("dali"))
        if self.info.is_main:
            JsonlLog.truncate_after(self.run_dir / "log.jsonl", self.step)
            JsonlLog.truncate_after(self.run_dir / "damaged.jsonl", self.step)
            evals = self.run_dir / "eval.jsonl"
            if evals.is_file():  # validations of the epoch being resumed are redone
                keep = [r for r in read_jsonl(evals) if r.get("epoch", 0) < self.epoch]
                atomic_write(evals, "".join(json.dumps(r) + "\n" for r in keep))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                 self.batch_in_epoch)

    # ------------------------------------------------------------------ run
    def check_data(self) -> None:
        """Stop before any epoch (one line, exit 2) when there is nothing to train or validate on."""
        batches, stats = epoch_plan(self.shards, self.cfg.data, self.cfg.model.downsample, 0, self.cfg.train.seed)
        if stats.utterances == 0:
            why = ", ".join(f"{k} {v}" for k, v in stats.skipped.items()) or "the index lists none"
            raise TrainingStopped(f"no usable training utterance in {self.shards.directory} ({len(self.shards)} in "
                                  f"its index; skipped: {why})")
        if self.dev is not None:
            lost = self.dev.damage_counts()
            if not self.dev.usable.any():
                raise TrainingStopped(f"no readable dev utterance in {self.dev_name} ({len(self.dev)} in its "
                                      f"index; unreadable: {', '.join(f'{k} {v}' for k, v in lost.items())})")
            if lost:
                log.warning("dev set %s: %d of %d utterances are unreadable (%s) and not scored",
                            self.dev_name, sum(lost.values()), len(self.dev), lost)

    def _setup(self) -> None:
        cfg = self.cfg
        self.check_data()
        self.dali = self._dali() if cfg.train.loader == "dali" else None
        n_batches = len(self.dali) if self.dali is not None else len(self.epoch_batches(0)[0])
        self.steps_per_epoch = dist.all_reduce_min(n_batches, self.device) // cfg.optim.grad_accum
        total_steps = cfg.optim.total_steps or max(1, self.steps_per_epoch * cfg.train.epochs)
        self.runner = StepRunner(self.model, cfg, self.device, self.info, total_steps, self.debug)
        self.reader = MetricReader(self.device)
        self.monitor = DeviceMonitor(self.device)
        self.sampler = PlanSampler()  # one loader for the run: its workers persist across epochs
        self.loader = make_loader(BatchDataset(self.shards, None, cfg.model.downsample),
                                  num_workers=cfg.data.num_workers, prefetch=cfg.data.prefetch,
                                  pin_memory=cfg.data.pin_memory and self.device.type == "cuda", sampler=self.sampler,
                                  hold=cfg.optim.grad_accum)
        if self.resume:
            self._restore()
        if self.runner.compiled and self.dali is None:
            shapes = [s for s in self.planned() if s[0] == capacity(cfg.data, s[1])]  # partial pow2: lazily
            if cfg.data.partial_batches == "pow2":
                log.warning("data.partial_batches=pow2 with torch.compile: partial batches compile mid-epoch; "
                            "use data.partial_batches=full for one graph per bucket")
            seconds = self.runner.warm_up(shapes)
            log.info("compiled the train step for %d planned shape(s) in %.1f s", len(shapes), seconds)

    def _check_run_dir(self) -> None:
        """Before the first step: the run folder is writable and has room for a checkpoint (one-line errors)."""
        ckpt_dir = check_writable(self.run_dir / "checkpoints", "the run folder")
        need = 3 * sum(p.numel() * p.element_size() for p in self.model.parameters()) + (1 << 20)  # + Adam
        free = shutil.disk_usage(ckpt_dir).free
        if free < 2 * need:
            raise UserError(f"the run folder {self.run_dir} has {free / 1e6:.1f} MB free; a checkpoint needs "
                            f"{need / 1e6:.1f} MB and is written beside the previous one")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def run(self) -> dict[str, Any]:
        dist.init(self.info, self.device)
        try:
            return self._run()
        finally:
            dist.shutdown()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._check_run_dir()
        if not self.resume and (self.run_dir / "checkpoints" / "last.pt").exists():
            raise UserError(f"{self.run_dir} already holds a run; use --resume to continue it or a new --out")
        self._setup()
        main = self.info.is_main
        if main:
            atomic_write(self.run_dir / "config.yaml", cfg.to_yaml())
        self.steplog = JsonlLog(self.run_dir / "log.jsonl", main)
        self.damagelog = JsonlLog(self.run_dir / "damaged.jsonl", True)
        for i in np.flatnonzero(self.shards.damage > 0):  # damage seen at open: listed once, key by key
            key = self.shards.key(int(i))
            self.damaged_keys.add(key)
            if main and not self.resume:
                self.damagelog.write({"step": 0, "rank": 0, "key": key,
                                      "reason": OPEN_DAMAGE[int(self.shards.damage[i])]})
        self.evallog = JsonlLog(self.run_dir / "eval.jsonl", main)
        self.tb = TensorBoard(self.run_dir / "tensorboard", main)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        stop_at = cfg.train.max_steps or self.steps_per_epoch * cfg.train.epochs
        bar = tqdm(total=max(0, stop_at - self.step), disable=not (main and self.progress), dynamic_ncols=True,
                   desc="train", unit="step")
        meter, started = Throughput(), time.perf_counter()
        reason = "done"
        try:
            while self.epoch < cfg.train.epochs and reason == "done":
                reason = self._train_epoch(stop_at, bar, meter)
                if reason == "epoch_end":
                    self._end_epoch()
                    reason = "done"
        finally:
            bar.close()
            self._flush()
            self.steplog.close()
            self.damagelog.close()
            self.evallog.close()
            self.tb.close()
        if reason in ("max_steps", "done"):
            if self.step and dist.all_reduce_sum([self.run_utts], self.device)[0] == 0 and not self.resume:
                raise TrainingStopped(f"{self.step} step(s) ran but read no usable utterance ({len(self.damaged_keys)}"
                                      f" damaged sample(s), see {self.run_dir / 'damaged.jsonl'})")
            self._save_last()
        rates = meter.rates()  # since the first step: compile warm-up excluded, validation and checkpoints in
        return {"step": self.step, "epoch": self.epoch, "reason": reason, "best_wer": self.best_wer,
                "utt_per_s": rates["utt_per_s"], "audio_s_per_s": rates["audio_s_per_s"],
                "data_wait": rates["data_wait"],
                "non_finite_steps": self.bad_total, "damaged_samples": len(self.damaged_keys),
                "dev_unreadable": self.dev_unreadable,
                "seconds": time.perf_counter() - started}

    def _train_epoch(self, stop_at: int, bar: tqdm, meter: Throughput) -> str:
        cfg, accum = self.cfg, self.cfg.optim.grad_accum
        self.epoch_utts = 0 if self.batch_in_epoch == 0 else 1  # a resumed epoch already trained on some
        if self.dali is not None:
            n_batches, it = self.steps_per_epoch * accum, iter(self.dali)
        elif self.remote is not None:
            n_batches = len(self.epoch_batches(self.epoch)[0])
            it = stream_loader(self.shards, self.remote, cfg.data, cfg.model.downsample, self.epoch, cfg.train.seed,
                               self.info.rank, self.info.world_size, self.batch_in_epoch, n_batches,
                               cfg.data.pin_memory and self.device.type == "cuda")
        else:
            batches, _ = self.epoch_batches(self.epoch)
            n_batches = len(batches)
            self.sampler.set(batches, self.batch_in_epoch)
            it = iter(self.loader)
        while self.batch_in_epoch < n_batches:
            if self.step >= stop_at:
                return "max_steps"
            t_wait = time.perf_counter()
            micro = [next(it) for _ in range(accum)]
            wait = time.perf_counter() - t_wait
            self._optimizer_step(micro)
            self.batch_in_epoch += accum
            real = sum(b["real"] for b in micro)
            self.epoch_utts += real
            self.run_utts += real
            for b in micro:
                for d in b.get("damaged", ()):
                    self.damaged_keys.add(d["key"])
                    self.damagelog.write({"step": self.step, "rank": self.info.rank, **d})
            frames = sum(int(b.get("lengths_host", b["lengths"]).sum()) for b in micro)  # host copies
            meter.add(real, frames, sum(b["feats"].shape[0] * b["feats"].shape[1] for b in micro), wait)
            bar.update(1)
            if self.step % max(cfg.train.log_every, 1) == 0:
                r = meter.rates()
                dev = self._device_note
                mem = dev.get("peak_mem_gb", dev.get("rss_gb"))
                bar.set_postfix_str(f"loss {self._last_loss:.3f} | {r['utt_per_s']:.0f} utt/s | "
                                    f"{r['audio_s_per_s']:.0f} audio-s/s | wait {100 * r['data_wait']:.0f}%"
                                    + (f" | mem {mem:.2f} GB" if mem is not None else "")
                                    + (f" | gpu {dev['gpu_util']:.0f}%" if "gpu_util" in dev else ""))
            if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                self._save_last()
            if self._preempted():
                self._save_last()
                self._requeue()
                return "preempted"
        if self.dali is not None:
            for _ in it:  # finish DALI's epoch so the next one starts at its beginning
                pass
        if dist.all_reduce_sum([self.epoch_utts], self.device)[0] == 0:
            raise TrainingStopped(f"epoch {self.epoch} read no usable utterance ({len(self.damaged_keys)} damaged "
                                  f"sample(s), see {self.run_dir / 'damaged.jsonl'}); the shards are unreadable")
        return "epoch_end"

    _last_loss = float("nan")
    _device_note: dict = {}  # noqa: RUF012 (the last record with device figures, for the progress bar)

    def _optimizer_step(self, micro: list[dict]) -> None:
        out = self.runner(micro, step_seed(self.cfg.train.seed, self.step + 1, self.info.rank))
        self.step += 1
        meta = {"step": self.step, "epoch": self.epoch, "lr": out["lr"], "utterances": sum(b["real"] for b in micro),
                "skipped_samples": sum(b["skipped"] for b in micro)}
        self._log(self.reader.push(out, meta))  # the steps the device has finished by now; never waits

    def _flush(self) -> None:
        """Wait for the steps still on the device and log them (before a checkpoint, a validation, the end)."""
        self._log(self.reader.drain())

    def _log(self, ready: list[tuple[list[float], dict]]) -> None:
        for values, meta in ready:
            record = step_record(values, meta)
            if record["step"] % max(self.cfg.train.log_every, 1) == 0:
                record.update(self.monitor.sample())  # this interval's peak memory (and GPU utilisation)
                self._device_note = record
            bad = record["non_finite"]
            self.bad_streak = self.bad_streak + 1 if bad else 0
            self.bad_total += int(bad)
            self._last_loss = record["loss"]
            self.steplog.write(record)
            self.tb.scalars(record["step"], {"train/loss": record["loss"], "train/lr": record["lr"],
                                             **{f"device/{k}": v for k, v in record.items()
                                                if k in ("peak_mem_gb", "rss_gb", "gpu_util")}})
            if bad:
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", record["step"],
                            self.bad_streak)
            if self.bad_streak >= self.cfg.train.max_bad_steps:
                raise TrainingStopped(f"{self.bad_streak} optimiser steps in a row had a non-finite loss or "
                                      f"gradient (step {record['step']}); lower --lr, use --precision bf16/fp32 or "
                                      "check the data")

    def _end_epoch(self) -> None:
        self._flush()
        epoch = self.epoch
        if self.dev is not None:
            res = evaluate(self.model, self.dev, self.cfg, self.device, self.cfg.train.eval_beam, self.runner.amp,
                           remote=self.dev_remote)
            self.dev_unreadable = res["damaged"]["count"]
            self.evallog.write(dev_record(res, epoch, self.step))
            self.tb.scalars(self.step, {"dev/loss": res["loss"], "dev/wer": res["wer"], "dev/cer": res["cer"]})
            # ties in WER are common on small dev sets; the dev loss breaks them (and is smoother)
            improved = (res["wer"], res["loss"]) < (self.best_wer, self.best_loss)
            if improved:
                self.best_wer, self.best_loss = res["wer"], res["loss"]
        else:
            improved = False
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        if self.info.is_main:
            payload = self._payload()
            payload["epoch_completed"] = epoch
            ckpt_dir = self.run_dir / "checkpoints"
            ckpt.atomic_save(payload, ckpt_dir / f"checkpoint_epoch_{epoch}.pt")
            if improved:
                ckpt.save_best(payload, ckpt_dir, epoch)
            keep = self.cfg.train.keep_epoch_checkpoints
            if keep:  # by epoch number, not file time (a copied or touched run folder keeps its order)
                for old in ckpt.epoch_checkpoints(self.run_dir)[:-keep]:
                    old.unlink()
            ckpt.atomic_save(payload, ckpt_dir / "last.pt")

    def _preempted(self) -> bool:
        """Every 10 steps the ranks agree (on the host, over gloo) whether any of them received the signal."""
        flag = 1 if self._stop_signal is not None else 0
        if self.info.distributed and self.step % 10 == 0:
            return bool(dist.all_reduce_max(flag))
        return bool(flag) and not self.info.distributed

    def _requeue(self) -> None:
        log.warning("signal %s: checkpoint saved at step %d", self._stop_signal, self.step)
        if self.info.is_main:
            dist.requeue_slurm_job()
