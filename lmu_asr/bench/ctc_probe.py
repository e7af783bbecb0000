"""Three stages of the GPU kit that look into the step: what the CTC costs, what activation checkpointing buys,
and where the step synchronises.

``ctc``: the CTC op alone with each way of passing its lengths, ATen's and our Triton kernels (syncs and time per
call), and the whole step with each CTC and with a stand-in loss of the same shape that never synchronises.
``checkpointing``: a preset at one shape with and without activation checkpointing, peak memory and step time
side by side. ``sync_bisect``: the step's synchronisations with one part changed at a time. The H200 run of
2026-11-26 counted 6 per step inside the compiled forward, and 0 in the CTC alone only because warnings raised
under ``torch.ops`` calls did not reach the counter then; this stage tells the parts apart.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmu_asr.bench.report import environment, markdown_table, write_report
from lmu_asr.config import Config
from lmu_asr.model import asr
from lmu_asr.model.encoder import frame_mask
from lmu_asr.train import step as step_module


def _syncs_and_ms(fn: Any, device: torch.device, calls: int = 10) -> tuple[float | None, float]:
    """(synchronisations per call counted by the sync debug mode, milliseconds per call by CUDA events)."""
    from lmu_asr.bench.gpu import record_syncs

    fn()  # first call outside the count: lazy initialisation
    if device.type != "cuda":
        import time

        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return None, 1000 * (time.perf_counter() - t) / calls
    torch.cuda.synchronize(device)
    syncs = sum(record_syncs(fn)[0].values())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return float(syncs), start.elapsed_time(end) / calls


def _op_variants(log_probs: torch.Tensor, targets: torch.Tensor, in_len: torch.Tensor, tl: torch.Tensor,
                 device: torch.device) -> list[tuple[str, Any]]:
    """ATen's CTC forward + backward, lengths as host int lists (what the step does) or as device tensors."""
    aten = torch.ops.aten
    d_in, d_tl = in_len.to(device), tl.to(device)

    def host_lists() -> None:
        asr._ctc_loss_and_grad(log_probs, targets, in_len, tl)

    def device_tensors() -> None:
        nll, alpha = aten._ctc_loss(log_probs, targets, d_in, d_tl, 0, True)
        aten._ctc_loss_backward(torch.ones_like(nll), log_probs, targets, d_in, d_tl, nll, alpha, 0, True)

    def triton() -> None:
        asr._ctc_loss_and_grad_triton(log_probs, targets, d_in, d_tl)

    variants = [("ATen, host int lists (train.ctc=aten)", host_lists), ("ATen, device tensors", device_tensors)]
    return variants + ([("Triton, device tensors (train.ctc=triton)", triton)] if device.type == "cuda" else [])


def ctc_op_rows(shapes: list[tuple[int, int]], device: torch.device) -> list[dict[str, Any]]:
    """ATen's CTC alone, each way of passing its lengths: syncs and milliseconds per call."""
    rows = []
    for batch, frames in shapes:
        b = step_module.synthetic_batch(batch, frames, seed=3)
        log_probs = torch.randn(frames // 2, batch, 29, device=device).log_softmax(-1)
        variants = _op_variants(log_probs, b["targets"].to(device), b["lengths"] // 2, b["target_lengths"], device)
        for name, fn in variants:
            try:
                syncs, ms = _syncs_and_ms(fn, device)
                rows.append({"batch": batch, "frames": frames, "lengths": name, "syncs": syncs, "ms": ms})
            except RuntimeError as err:  # an overload this torch does not take on this device
                rows.append({"batch": batch, "frames": frames, "lengths": name, "error": str(err)[:120]})
    return rows


def standin_loss(logits: torch.Tensor, out_lengths: torch.Tensor, targets: torch.Tensor,
                 target_lengths: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
    """A loss with CTC's inputs and output shape but no alignment and no host read: the step's floor."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        lp = logits.float().log_softmax(-1)
        mask = frame_mask(out_lengths, lp.shape[1]).to(lp.dtype)
        return -(lp[..., 0] * mask).sum() / mask.sum().clamp(min=1)


@contextlib.contextmanager
def loss_in_step(loss: Any) -> Iterator[None]:
    """The train step with ``loss`` in place of the CTC (same arguments), recompiled; the CTC back afterwards."""
    torch._dynamo.reset()  # a compiled step must trace the loss it is given now
    step_module.ctc_loss = loss
    try:
        yield
    finally:
        step_module.ctc_loss = asr.ctc_loss


def with_ctc(cfg: Config, ctc: str) -> Config:
    c = copy.deepcopy(cfg)
    c.train.ctc = ctc
    return c


def step_rows(cfg: Config, shapes: list[tuple[int, int]], device: torch.device, steps: int,
              windows: int) -> list[dict[str, Any]]:
    """The whole train step with ATen's CTC, ours (on a GPU) and the stand-in loss, side by side."""
    from lmu_asr.bench.train import bench_train_config

    losses = [("ATen CTC", "aten", asr.ctc_loss)]
    if device.type == "cuda":
        losses.append(("Triton CTC", "triton", asr.ctc_loss))
    rows = []
    for batch, frames in shapes:
        for name, ctc, loss in (*losses, ("stand-in (no CTC)", "aten", standin_loss)):
            with loss_in_step(loss):
                r = bench_train_config(with_ctc(cfg, ctc), batch, frames, device, steps, windows)
            rows.append({"batch": batch, "frames": frames, "loss": name, "step_ms": r["step_ms"],
                         "utt_per_s": r["utt_per_s"]})
        free = rows[-1]["step_ms"]
        for row in rows[-len(losses) - 1:-1]:
            row["ctc_share"] = (row["step_ms"] - free) / row["step_ms"]
    return rows


def bench_ctc(out: Path, cfg: Config, device: torch.device, shapes: list[tuple[int, int]], steps: int = 10,
              windows: int = 2) -> dict[str, Any]:
    op = ctc_op_rows(shapes, device)
    steps_ = step_rows(cfg, shapes, device, steps, windows)
    data = {"env": environment(device), "preset": cfg.preset, "op_rows": op, "step_rows": steps_}
    body = ("The CTC op alone, forward + backward (random log-probabilities, ~14 characters per second):\n\n"
            + markdown_table(op, [("batch", "batch"), ("frames", "frames"), ("lengths", "lengths passed as"),
                                  ("syncs", "syncs / call"), ("ms", "ms / call")])
            + f"\n\nThe whole train step (preset `{cfg.preset}`), with each CTC and with a stand-in loss that has "
              "no alignment and no host read; `CTC share` is the step time that CTC costs, syncs included:\n\n"
            + markdown_table(steps_, [("batch", "batch"), ("frames", "frames"), ("loss", "loss"),
                                      ("step_ms", "ms/step"), ("utt_per_s", "utt/s"), ("ctc_share", "CTC share")]))
    data["files"] = [str(p) for p in write_report(out, "ctc_cost", "What CTC costs the step", data, body)]
    return data


def bench_checkpointing(out: Path, cfg: Config, device: torch.device, shape: tuple[int, int], steps: int = 10,
                        windows: int = 2) -> dict[str, Any]:
    from lmu_asr.bench.train import activation_estimate, bench_train_config

    rows = []
    for ckpt in (False, True):
        c = copy.deepcopy(cfg)
        c.model.activation_checkpointing = ckpt
        torch._dynamo.reset()
        r = bench_train_config(c, shape[0], shape[1], device, steps, windows)
        rows.append({"checkpointing": ckpt, "batch": shape[0], "frames": shape[1], "step_ms": r["step_ms"],
                     "utt_per_s": r["utt_per_s"], "peak_gb": r.get("max_allocated_gb") or r.get("max_rss_gb"),
                     "estimate_gb": activation_estimate(c)["total_gb"]})
    data = {"env": environment(device), "preset": cfg.preset, "rows": rows}
    body = (f"Preset `{cfg.preset}` at {shape[0]} x {shape[1]} frames, with and without activation "
            "checkpointing (peak = torch.cuda.max_memory_allocated; estimate = `activation_estimate`, CPU):\n\n"
            + markdown_table(rows, [("checkpointing", "checkpointing"), ("step_ms", "ms/step"),
                                    ("utt_per_s", "utt/s"), ("peak_gb", "peak GB"), ("estimate_gb", "estimate GB")]))
    data["files"] = [str(p) for p in write_report(out, "checkpointing", "Activation checkpointing", data, body)]
    return data


def bench_sync_bisect(out: Path, cfg: Config, device: torch.device, shape: tuple[int, int],
                      steps: int = 3) -> dict[str, Any]:
    """Where a steady-state step synchronises: the count with one part of the step changed at a time.

    The H200 run of 2026-11-26 counted 6 syncs per step, raised from C++ while AOTAutograd's compiled forward ran
    (innermost Python frame ``torch/autograd/function.py: apply``), with CTC alone at 0 -- a count that missed
    warnings raised under ``torch.ops`` calls (fixed since, see ``bench.gpu._WarningScope``). ATen's CUDA CTC
    makes 3 blocking host->device copies in its forward and 3 in its backward, which our op runs together in the
    compiled forward; the variants below tell that apart from the model's parts in one run."""
    from lmu_asr.bench.gpu import count_syncs
    from lmu_asr.bench.train import bench_train_config

    def variant(name: str, change: Any, loss: Any = None) -> dict[str, Any]:
        c = copy.deepcopy(cfg)
        change(c)
        with loss_in_step(loss or asr.ctc_loss):
            r = bench_train_config(c, shape[0], shape[1], device, 2, 1, warmup=2, keep_runner=True)
            counted = count_syncs(r.pop("runner"), step_module.synthetic_batch(*shape, seed=5), steps, device)
        top = max((counted.get("stacks") or {}).items(), key=lambda kv: kv[1], default=("", 0))[0]
        return {"variant": name, "syncs_per_step": counted["syncs_per_step"], "step_ms": r["step_ms"],
                "top_stack": top[:300], "stacks": counted.get("stacks")}

    def lmu_chunk(c: Config) -> None:
        c.model.lmu_mode = "chunk"

    def no_specaug(c: Config) -> None:
        c.data.specaug.enabled = False

    def eager(c: Config) -> None:
        c.train.compile = "off"

    def aten_ctc(c: Config) -> None:
        c.train.ctc = "aten"

    def no_dropout(c: Config) -> None:
        c.model.dropout = c.model.attn_dropout = 0.0

    rows = [variant("as configured", lambda c: None), variant("ATen CTC (train.ctc=aten)", aten_ctc),
            variant("LMU chunk form (no FFT)", lmu_chunk),
            variant("stand-in loss (no CTC)", lambda c: None, standin_loss),
            variant("no SpecAugment", no_specaug), variant("no dropout", no_dropout),
            variant("eager (not compiled)", eager)]
    data = {"env": environment(device), "preset": cfg.preset, "shape": list(shape), "rows": rows}
    body = (f"Preset `{cfg.preset}` at {shape[0]} x {shape[1]}: host-device synchronisations per steady-state "
            "step (`torch.cuda.set_sync_debug_mode`), one part of the step changed at a time:\n\n"
            + markdown_table(rows, [("variant", "variant"), ("syncs_per_step", "syncs / step"),
                                    ("step_ms", "ms/step"), ("top_stack", "most frequent stack (innermost first)")]))
    data["files"] = [str(p) for p in write_report(out, "sync_bisect", "Where the step synchronises", data, body)]
    return data
