"""The optimiser step and its read-out: what ``lmuasr train`` runs and ``lmuasr bench train`` times (the same code).

Forward + CTC loss is one compiled graph (``CTCTrainStep``, wrapped in DDP when distributed). Nothing in a
steady-state step waits for the device:

* the CTC (``train.ctc``): ours, two Triton kernels that read the lengths on the device, on CUDA by default; ATen's
  takes the loader's host copies of the lengths, but its CUDA kernels copy them to the device, blocking, 3 times
  in the forward and 3 in the backward (the H200's 6 syncs a step), and given device tensors it would copy them
  back to the host instead;
* a non-finite loss or gradient is skipped on the device (fused AdamW's ``found_inf``, or the GradScaler);
* loss, gradient norm and the bad-step flag go into a pinned host buffer by a non-blocking copy, with a CUDA
  event behind it; :class:`MetricReader` hands a step's values over only once its event has completed, so the
  trainer logs each step a few steps late instead of stalling the queue (``drain()`` waits, at checkpoints and
  the end of a run).

Shapes are planned (``lmu_asr.data.sampler.planned_shapes``): with ``compile_shapes="static"`` every shape is
compiled once by :meth:`StepRunner.warm_up` before training (``--dry-run`` prints the count), so no step
recompiles; ``"dynamic"`` compiles one graph with a dynamic time axis instead. The global RNG is reseeded from
the step's seed before the forward, so dropout and SpecAugment draw the same numbers in a resumed run.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from lmu_asr.config import Config, OptimConfig, compile_enabled
from lmu_asr.data.dataset import to_device
from lmu_asr.model.asr import LMUASR, ctc_loss
from lmu_asr.model.encoder import downsampled_lengths, frame_mask
from lmu_asr.train.dist import DistInfo

log = logging.getLogger(__name__)


class CTCTrainStep(nn.Module):
    """Forward + CTC loss as one module: what DDP wraps and torch.compile turns into one graph.

    ``encode``: what computes (logits, output lengths) instead of ``model`` itself; ``compile_mode=cudagraphs``
    with ATen's CTC puts the model compiled with CUDA graphs there and leaves the CTC (host lengths, ATen's own
    copies) eager. ``ctc``: "aten" or "triton" (:func:`resolve_ctc`).
    """

    def __init__(self, model: LMUASR, encode: Any = None, ctc: str = "aten") -> None:
        super().__init__()
        self.model, self.ctc = model, ctc
        # not a submodule: the compiled wrapper shares the model's parameters, which must be registered once
        self.__dict__["encode"] = encode

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor, host_out_lengths: torch.Tensor | None = None,
                host_target_lengths: torch.Tensor | None = None) -> torch.Tensor:
        logits, out_lengths = (self.encode if self.encode is not None else self.model)(feats, lengths)
        return ctc_loss(logits, out_lengths, targets, target_lengths, host_out_lengths, host_target_lengths,
                        impl=self.ctc)


def triton_ctc_usable(device: torch.device) -> str | None:
    """See :func:`_triton_ctc_check`; checked once per device (and interpreter setting) in a process."""
    import os

    return _triton_ctc_check(str(device), os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _triton_ctc_check(device_name: str, interpreted: bool) -> str | None:
    """None when our Triton CTC runs on ``device`` and matches ATen's on a small batch; else the reason why not.

    On a CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``, how CI tests it). The check costs
    the kernels' compilation (seconds, once per process) and guards a default against a Triton build that
    miscompiles them."""
    device = torch.device(device_name)
    if device.type == "cpu" and not interpreted:
        return "Triton kernels need a GPU (or TRITON_INTERPRET=1)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    from lmu_asr.model.asr import _ctc_loss_and_grad, _ctc_loss_and_grad_triton

    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(40, 6, 29, generator=g).log_softmax(-1).to(device)
    targets = torch.randint(1, 29, (6, 12), generator=g)
    targets[0, :4] = 7  # repeats need a blank between them
    in_len, tl = torch.tensor([40, 33, 20, 5, 40, 1]), torch.tensor([12, 9, 12, 4, 0, 3])
    try:
        want = _ctc_loss_and_grad(log_probs, targets.to(device), in_len, tl)
        got = _ctc_loss_and_grad_triton(log_probs, targets.to(device), in_len.to(device), tl.to(device))
    except Exception as err:  # a Triton or driver build that cannot compile or launch the kernels
        return f"{type(err).__name__}: {str(err)[:200]}"
    for name, a, b in (("loss", got[0], want[0]), ("gradient", got[1], want[1])):
        err = float((a.cpu() - b.cpu()).abs().max())
        if not err <= 1e-3:
            return f"its {name} differs from ATen's by {err:.3g}"
    return None


def resolve_ctc(choice: str, device: torch.device) -> str:
    """``train.ctc`` -> the implementation the step runs: "aten" or "triton" (see :func:`triton_ctc_usable`)."""
    if choice == "aten" or (choice == "auto" and device.type != "cuda"):
        return "aten"
    why = triton_ctc_usable(device)
    if why is None:
        return "triton"
    if choice == "triton":
        raise ValueError(f"train.ctc=triton: {why}")
    log.warning("CTC: ATen's kernels (6 blocking copies a step), not ours: %s", why)
    return "aten"


def resolve_compile_mode(cfg: Config, device: torch.device, ctc: str, distributed: bool) -> str:
    """``train.compile_mode`` -> "default" or "cudagraphs" (only meaningful when the step is compiled).

    auto picks CUDA graphs only where they hold the whole step: on CUDA with our Triton CTC (ATen's copies its
    host lengths, which a graph cannot capture), one optimiser step per batch, and one process. On an H200 that
    made the b96 step 2.6x faster (6.8 vs 17.5 ms, side by side; the default was host-bound). Under DDP the
    reducer's hooks would run between graph replays, which no GPU run here has measured, so DDP keeps the
    default until one does.
    """
    mode = cfg.train.compile_mode
    if mode != "auto":
        return mode
    whole = device.type == "cuda" and ctc == "triton" and cfg.optim.grad_accum == 1 and not distributed
    return "cudagraphs" if whole else "default"


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


def seed_step(seed: int, device: torch.device) -> None:
    """Reseed the two generators a step draws from: the CPU's and ``device``'s own.

    Why not ``torch.manual_seed``: it seeds every backend (each CUDA device, MPS, XPU, MTIA), the uninitialised
    ones through a lazy call that captures the Python stack: 120 us a step on this CPU, 310 us under a 30-frame
    stack, against 1-2 us for the generators the step uses: a few per cent of a 7.5 ms CUDA-graph step whose
    host side paces the loop. The numbers drawn are the same (tested), so resume stays exact.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device, cpu_autocast: bool = False) -> torch.dtype | None:
    """The autocast dtype of a run: None for fp32, and on CPU unless ``train.cpu_autocast`` asks for it."""
    if precision == "fp32" or (device.type != "cuda" and not cpu_autocast):
        return None  # CPU runs fp32 by default: autocast there is slower and not what a GPU run computes
    return torch.bfloat16 if precision == "bf16" else torch.float16


def host_lengths(batch: dict, downsample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(CTC input lengths, target lengths) on the host, from the loader's CPU copies (no device read)."""
    lengths = batch.get("lengths_host", batch["lengths"])
    targets = batch.get("target_lengths_host", batch["target_lengths"])
    if lengths.device.type != "cpu" or targets.device.type != "cpu":
        raise ValueError("a batch must carry its lengths on the host (lengths_host)")
    return downsampled_lengths(lengths, downsample), targets


def synthetic_batch(rows: int, frames: int, seed: int = 0) -> dict[str, Any]:
    """A batch of one shape: random features, lengths uniform in [frames/2, frames], ~14 characters per second."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, frames // 2), frames + 1, (rows,), generator=g)
    feats = torch.randn(rows, frames, 80, generator=g).to(torch.float16)
    feats *= frame_mask(lengths, frames)[..., None]
    tlens = lengths // 7
    targets = torch.randint(3, 29, (rows, frames // 2), generator=g)
    targets *= frame_mask(tlens, frames // 2)
    return {"feats": feats, "lengths": lengths, "targets": targets, "target_lengths": tlens, "real": rows,
            "skipped": 0}


class StepRunner:
    """Model, optimiser, schedule, AMP, DDP and compile around one optimiser step (``__call__``)."""

    def __init__(self, model: LMUASR, cfg: Config, device: torch.device, info: DistInfo, total_steps: int,
                 debug: bool = False) -> None:
        self.model, self.cfg, self.device, self.info, self.debug = model.to(device), cfg, device, info, debug
        self.opt = make_optimizer(model, cfg.optim)
        self.amp = autocast_dtype(cfg.train.precision, device, cfg.train.cpu_autocast)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg.optim, total_steps))
        self.compiled = compile_enabled(cfg, device.type)
        dynamic = cfg.train.compile_shapes == "dynamic"
        self.ctc = resolve_ctc(cfg.train.ctc, device)
        # data.specaug.tempo: the model changes each utterance's length, so the loader's host copies of the output
        # lengths are wrong; ATen's CTC then copies the device lengths (on CUDA, blocking; the Triton CTC never
        # reads host lengths)
        self.stretches = model.augment is not None and model.augment.changes_lengths
        # CUDA graphs replay a whole step's kernels with one launch: what a host-bound step (small batches on a
        # fast GPU) needs. With our Triton CTC (device lengths, no host copy) the graph holds forward + CTC +
        # backward; ATen's CTC cannot be captured (host lengths, blocking copies), so with it this mode compiles
        # the model alone and runs the loss eagerly after it.
        self.compile_mode = resolve_compile_mode(cfg, device, self.ctc, info.distributed)
        self.cudagraphs = self.compiled and self.compile_mode == "cudagraphs"
        whole_graph = self.cudagraphs and self.ctc == "triton"
        encode = (torch.compile(model, mode="reduce-overhead", dynamic=dynamic)
                  if self.cudagraphs and not whole_graph else None)
        module: nn.Module = CTCTrainStep(model, encode, self.ctc)
        if info.distributed:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        self.ddp = module
        if self.compiled:
            # static shapes: one graph per planned (rows, bucket), more than dynamo's default cache of 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 1024)
        if whole_graph:
            self.fn = torch.compile(module, mode="reduce-overhead", dynamic=dynamic)
        elif self.compiled and not self.cudagraphs:
            self.fn = torch.compile(module, dynamic=dynamic)
        else:  # eager, or the model alone under CUDA graphs (``encode``) with ATen's CTC after it
            self.fn = module
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

    def _loss(self, batch: dict, scale: float) -> torch.Tensor:
        if self.cudagraphs:  # a new forward: what the graphs returned last time (used up by now) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        # the Triton CTC reads the device lengths: no CPU tensor enters the graph (a CUDA graph could not take it)
        host_out, host_tl = host_lengths(batch, self.cfg.model.downsample) if self.ctc == "aten" else (None, None)
        if self.stretches:  # the model draws each utterance's new length on the device: no host copy of it
            host_out = None
        b = to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = self.fn(b["feats"], b["lengths"], b["targets"], b["target_lengths"], host_out, host_tl)
        if self.debug:
            self._debug_checks(b, loss)
        return loss * scale if scale != 1 else loss

    def __call__(self, micro: list[dict], seed: int) -> dict[str, Any]:
        """One optimiser step over ``micro`` (gradient-accumulated) batches; returns device tensors, unread."""
        accum = len(micro)
        seed_step(seed, self.device)
        self.model.train()
        total = torch.zeros((), device=self.device)
        for a, batch in enumerate(micro):
            sync = self.ddp.no_sync() if (self.info.distributed and a < accum - 1) else contextlib.nullcontext()
            with sync:
                loss = self._loss(batch, 1 / accum)
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

    def warm_up(self, shapes: list[tuple[int, int]]) -> float:
        """Compile forward and backward for every planned shape before training; returns the seconds it took.

        Runs on silent rows with the weights and every RNG state restored afterwards: the run that follows is
        bit-identical to one without a warm-up (tested), it just never compiles mid-epoch. With dynamic shapes
        one shape compiles the graph. Every rank warms up the same shapes in the same order (DDP all-reduces).
        """
        if not self.compiled:
            return 0.0
        if self.cfg.train.compile_shapes == "dynamic":
            shapes = shapes[-1:]
        t0 = time.perf_counter()
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        self.model.train()
        for rows, frames in shapes:
            batch = {"feats": torch.zeros(rows, frames, 80, dtype=torch.float16),
                     "lengths": torch.full((rows,), frames, dtype=torch.int64),
                     "targets": torch.full((rows, frames // self.cfg.model.downsample), 3, dtype=torch.int64),
                     "target_lengths": torch.ones(rows, dtype=torch.int64)}
            self._loss(batch, 1.0).backward()
            self.model.zero_grad(set_to_none=True)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _debug_checks(self, b: dict, loss: torch.Tensor) -> None:
        assert torch.isfinite(b["feats"].float()).all(), "non-finite input features"
        assert int(b["targets"].max()) < self.cfg.model.vocab_size, "label outside the vocabulary"
        assert bool((b["lengths"] <= b["feats"].shape[1]).all()), "length beyond the padded batch"
        log.info("debug: batch %s, targets %s, loss %.4f", tuple(b["feats"].shape), tuple(b["targets"].shape),
                 float(loss.detach()))


def step_record(values: list[float], meta: dict[str, Any]) -> dict[str, Any]:
    """The ``log.jsonl`` record of one step from the values :class:`MetricReader` handed over."""
    loss, gnorm, bad = values
    record = {"step": meta["step"], "epoch": meta["epoch"], "loss": loss, "lr": meta["lr"], "grad_norm": gnorm,
              "utterances": meta["utterances"], "non_finite": bool(bad)}
    if meta.get("skipped_samples"):
        record["skipped_samples"] = meta["skipped_samples"]
    return record


class MetricReader:
    """A step's loss, gradient norm and bad-step flag -> the host, read only once the device has produced them.

    ``push`` queues a non-blocking copy into a pinned host buffer and records a CUDA event; ``poll`` returns the
    steps whose events have completed (never waits); ``drain`` waits for all. On a CPU the values are ready at
    once. ``depth`` bounds how far the host may run ahead before ``push`` waits for the oldest step.
    """

    def __init__(self, device: torch.device, depth: int = 8) -> None:
        self.cuda = device.type == "cuda"
        self.depth = depth
        self.pending: collections.deque = collections.deque()
        self.buffers = [torch.empty(3, pin_memory=True) for _ in range(depth + 1)] if self.cuda else []
        self.next = 0

    def push(self, out: dict[str, Any], meta: dict[str, Any]) -> list[tuple[list[float], dict]]:
        if out["work"] is not None:
            out["work"].wait()  # NCCL: the stream waits, not the host; gloo (CPU): done already
        values = torch.stack([out["loss"].detach().float(), out["grad_norm"].detach().float(),
                              out["bad"].float()])
        ready = []
        if len(self.pending) >= self.depth:  # the device is far behind: wait for the oldest step only
            ready += self._take(block=True, limit=1)
        if self.cuda:
            buf = self.buffers[self.next]
            self.next = (self.next + 1) % len(self.buffers)
            buf.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((event, buf, meta))
        else:
            self.pending.append((None, values, meta))
        return ready + self.poll()

    def _take(self, block: bool, limit: int | None = None) -> list[tuple[list[float], dict]]:
        out = []
        while self.pending and (limit is None or len(out) < limit):
            event, buf, meta = self.pending[0]
            if event is not None and not event.query():
                if not block:
                    break
                event.synchronize()
            self.pending.popleft()
            out.append((buf.tolist(), meta))
        return out

    def poll(self) -> list[tuple[list[float], dict]]:
        return self._take(block=False)

    def drain(self) -> list[tuple[list[float], dict]]:
        return self._take(block=True)
