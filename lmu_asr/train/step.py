"""The optimiser step: what ``lmuasr train`` runs and ``lmuasr bench train`` times (the same code).

Forward + CTC loss is one compiled graph (``CTCTrainStep``, wrapped in DDP when distributed). The step never
waits for the device: a non-finite loss or gradient is skipped by fused AdamW on the device (``found_inf``), or by
the GradScaler under fp16, and the caller reads the returned tensors later (one step behind). The global RNG is
reseeded from the step's seed before the forward, so dropout and SpecAugment draw the same numbers in a resumed
run as in an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch import nn

from lmu_asr.config import Config, OptimConfig, compile_enabled
from lmu_asr.data.dataset import to_device
from lmu_asr.model.asr import LMUASR, ctc_loss
from lmu_asr.train.dist import DistInfo

log = logging.getLogger(__name__)


class CTCTrainStep(nn.Module):
    """Forward + CTC loss as one module: what DDP wraps and torch.compile turns into one graph."""

    def __init__(self, model: LMUASR) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        logits, out_lengths = self.model(feats, lengths)
        return ctc_loss(logits, out_lengths, targets, target_lengths)


def lr_factor(cfg: OptimConfig, total_steps: int):  # noqa: ANN201 (returns a lambda for LambdaLR)
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norms; fused (one kernel, and device-side step skipping)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None  # CPU runs fp32: autocast there is slower and not what a GPU run would compute anyway
    return torch.bfloat16 if precision == "bf16" else torch.float16


class StepRunner:
    """Model, optimiser, schedule, AMP, DDP and compile around one optimiser step (``__call__``)."""

    def __init__(self, model: LMUASR, cfg: Config, device: torch.device, info: DistInfo, total_steps: int,
                 debug: bool = False) -> None:
        self.model, self.cfg, self.device, self.info, self.debug = model.to(device), cfg, device, info, debug
        self.opt = make_optimizer(model, cfg.optim)
        self.amp = autocast_dtype(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg.optim, total_steps))
        module: nn.Module = CTCTrainStep(model)
        if info.distributed:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        self.ddp = module
        self.compiled = compile_enabled(cfg, device.type)
        if self.compiled:
            # one graph per (bucket, rows) shape: more than dynamo's default cache of 8 recompiles
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 512)
        self.fn = torch.compile(module) if self.compiled else module
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def __call__(self, micro: list[dict], seed: int) -> dict[str, Any]:
        """One optimiser step over ``micro`` (gradient-accumulated) batches; returns device tensors, unread."""
        accum = len(micro)
        torch.manual_seed(seed)
        self.model.train()
        total = torch.zeros((), device=self.device)
        for a, batch in enumerate(micro):
            b = to_device(batch, self.device)
            sync = self.ddp.no_sync() if (self.info.distributed and a < accum - 1) else contextlib.nullcontext()
            with sync, torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                      enabled=self.amp is not None):
                loss = self.fn(b["feats"], b["lengths"], b["targets"], b["target_lengths"]) / accum
            if self.debug:
                self._debug_checks(b, loss)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or math.inf)
        bad = ~torch.isfinite(gnorm) | ~torch.isfinite(total)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.found_inf = bad.to(torch.float32)  # fused AdamW skips the update on the device
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        work = None
        if self.info.distributed:  # the logged loss is the mean over ranks, gathered without blocking this step
            total = total / self.info.world_size
            work = torch.distributed.all_reduce(total, async_op=True)
        return {"loss": total, "work": work, "grad_norm": gnorm, "bad": bad, "lr": lr}

    def _debug_checks(self, b: dict, loss: torch.Tensor) -> None:
        assert torch.isfinite(b["feats"].float()).all(), "non-finite input features"
        assert int(b["targets"].max()) < self.cfg.model.vocab_size, "label outside the vocabulary"
        assert bool((b["lengths"] <= b["feats"].shape[1]).all()), "length beyond the padded batch"
        log.info("debug: batch %s, targets %s, loss %.4f", tuple(b["feats"].shape), tuple(b["targets"].shape),
                 float(loss.detach()))
