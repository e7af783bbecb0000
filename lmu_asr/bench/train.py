"""``lmuasr bench train`` and ``bench scale``: the real optimiser step (``StepRunner``), timed properly.

* synthetic batches (no data needed): utterance lengths uniform in [max/2, max] frames, padded to the bucket,
  transcripts of ~14 characters per second; or real shards through the real loader (``--shards``), which adds
  the data-wait fraction.
* warm-up steps (compile included, reported separately) are excluded; the device is synchronised once per timed
  window, not per step (a sync per step would add the host's launch latency to every step); the median window is
  reported.
* MFU = counted FLOPs of the step (``count_flops``: matmuls, convolutions, attention, FFTs) / time / device peak
  (bf16 dense, from a table; ``--peak-tflops`` overrides). On a CPU the peak is measured: a large fp32 matmul.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lmu_asr.bench.report import (
    SEED_REFERENCE,
    environment,
    markdown_table,
    peak_flops,
    torch_threads,
    write_report,
)
from lmu_asr.config import Config
from lmu_asr.data.specaug import SpecAugment
from lmu_asr.model.asr import LMUASR, count_flops
from lmu_asr.train.dist import DistInfo
from lmu_asr.train.metrics import JsonlLog
from lmu_asr.train.step import MetricReader, StepRunner, step_record, synthetic_batch


def cpu_matmul_peak() -> float:
    """Achieved fp32 FLOP/s of a large matmul on this CPU: the 'peak' CPU MFU is measured against."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - t)


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"max_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "max_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
    return {"max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def time_steps(runner: StepRunner, batches: list[dict], steps: int, windows: int, device: torch.device,
               warmup: int) -> tuple[float, float, list[float]]:
    """(seconds of the first step incl. compile, median seconds per step, per-window step times).

    Each step is what the trainer runs: the optimiser step, then the metric read-out (``MetricReader.push`` and
    the ``log.jsonl`` record of every step the device has finished); a window ends when all its steps are read.
    """
    reader = MetricReader(device)
    sink = JsonlLog(Path(os.devnull))
    step = 0

    def one(batch: dict) -> None:
        nonlocal step
        step += 1
        out = runner([batch], seed=step)
        meta = {"step": step, "epoch": 0, "lr": out["lr"], "utterances": batch["real"], "skipped_samples": 0}
        for values, m in reader.push(out, meta):
            sink.write(step_record(values, m))

    def finish() -> None:
        for values, m in reader.drain():
            sink.write(step_record(values, m))

    t = time.perf_counter()
    one(batches[0])
    finish()
    first = time.perf_counter() - t
    for i in range(max(warmup - 1, 0)):
        one(batches[i % len(batches)])
    finish()
    per_step = []
    for w in range(windows):
        t = time.perf_counter()
        for i in range(steps):
            one(batches[(w * steps + i) % len(batches)])
        finish()
        per_step.append((time.perf_counter() - t) / steps)
    sink.close()
    return first, statistics.median(per_step), per_step


def _saved_bytes(model: LMUASR, rows: int, frames: int, dtype: torch.dtype | None) -> int:
    """Bytes the autograd graph keeps for one forward of (rows, frames): activations, deduplicated by storage."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    feats = torch.randn(rows, frames, 80)
    lengths = torch.full((rows,), frames)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        model(feats, lengths)
    return sum(seen.values())


def activation_estimate(cfg: Config) -> dict[str, Any]:
    """GPU memory a training step of this config needs, estimated on the CPU (no GPU needed).

    Saved activations are measured with saved-tensor hooks under the run's autocast dtype at 1 and 2 rows of each
    planned bucket and extrapolated linearly to the bucket's rows (activations grow with rows; the LMU kernel
    does not); weights, gradients and AdamW's two moments are 16 bytes per parameter. Transient buffers of the
    backward and the allocator's slack are not counted: an estimate, to be checked by ``bench train`` on a GPU.
    """
    from lmu_asr.data.sampler import planned_shapes
    from lmu_asr.train.step import autocast_dtype

    torch.manual_seed(0)
    model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug), max_frames=cfg.data.max_frames).train()
    dtype = autocast_dtype(cfg.train.precision, torch.device("cuda"))
    ckpt = cfg.model.activation_checkpointing
    per_shape = []
    with torch_threads(1):
        def at(rows: int, frames: int) -> int:  # linear in rows: measured at 1 and 2, extrapolated
            one, two = _saved_bytes(model, 1, frames, dtype), _saved_bytes(model, 2, frames, dtype)
            return one + (two - one) * (rows - 1)

        for rows, frames in planned_shapes(cfg.data, cfg.model.downsample):
            kept = at(rows, frames)
            if ckpt:  # the backward recomputes one block at a time: add one block's activations at the peak
                model.cfg.activation_checkpointing = False
                full = at(rows, frames)
                model.cfg.activation_checkpointing = True
                kept += max(0, full - kept) / cfg.model.n_blocks
            per_shape.append({"rows": rows, "frames": frames, "activations_gb": kept / 1e9})
    states = 16 * model.num_parameters() / 1e9
    top = max(per_shape, key=lambda r: r["activations_gb"])
    return {"largest_shape": f"{top['rows']}x{top['frames']}", "activations_gb": top["activations_gb"],
            "weights_grads_adam_gb": states, "total_gb": top["activations_gb"] + states,
            "precision": cfg.train.precision, "activation_checkpointing": cfg.model.activation_checkpointing,
            "per_shape": per_shape}


def bench_train_config(cfg: Config, batch: int, frames: int, device: torch.device, steps: int = 10,
                       windows: int = 3, warmup: int = 3, peak_tflops: float | None = None,
                       keep_runner: bool = False) -> dict[str, Any]:
    """Throughput of one configuration on synthetic batches (static shape, as the bucketed loader gives)."""
    torch.manual_seed(0)
    model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug), max_frames=max(cfg.data.max_frames, frames))
    flops_step = count_flops(model, batch, frames)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = StepRunner(model, cfg, device, DistInfo(), total_steps=10_000)
    batches = [synthetic_batch(batch, frames, seed=s) for s in range(4)]
    first, step_s, windows_s = time_steps(runner, batches, steps, windows, device, warmup)
    real_frames = statistics.mean(int(b["lengths"].sum()) for b in batches)
    peak = peak_flops(device, peak_tflops) or (cpu_matmul_peak() if device.type == "cpu" else None)
    return {"batch": batch, "frames": frames, "precision": cfg.train.precision, "compile": runner.compiled,
            "compile_mode": runner.compile_mode if runner.compiled else "off", "ctc": runner.ctc, "lmu_mode": cfg.model.lmu_mode,
            "it_per_s": 1 / step_s, "utt_per_s": batch / step_s,
            "audio_s_per_s": real_frames / 100 / step_s, "frames_per_s": real_frames / step_s,
            "padding": 1 - real_frames / (batch * frames), "step_ms": 1000 * step_s,
            "window_step_ms": [1000 * w for w in windows_s], "first_step_s": first,
            "compile_s": first - step_s if runner.compiled else 0.0, "flops_per_step": flops_step,
            "gflops_per_utt": flops_step / batch / 1e9, "achieved_tflops": flops_step / step_s / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": flops_step / step_s / peak if peak else None,
            "peak_basis": "device table (bf16 dense)" if device.type == "cuda" or peak_tflops else
            "measured fp32 matmul on this CPU", **peak_memory_gb(device),
            **({"runner": runner} if keep_runner else {})}


def bench_train_shards(cfg: Config, shards_dir: Path, device: torch.device, steps: int = 30,
                       warmup: int = 3) -> dict[str, Any]:
    """The real loader feeding the real step: throughput, padding and the fraction of time spent waiting for data."""
    from lmu_asr.data.dataset import BatchDataset, make_loader
    from lmu_asr.data.sampler import epoch_plan
    from lmu_asr.data.shards import ShardSet

    shards = ShardSet.open(shards_dir)
    torch.manual_seed(0)
    model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug), max_frames=cfg.data.max_frames)
    model.set_normalization(*shards.stats())
    runner = StepRunner(model, cfg, device, DistInfo(), total_steps=10_000)
    batches, stats = epoch_plan(shards, cfg.data, cfg.model.downsample, 0, 0)
    loader = make_loader(BatchDataset(shards, batches, cfg.model.downsample), 0, cfg.data.num_workers,
                         cfg.data.prefetch, cfg.data.pin_memory and device.type == "cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    it = iter(loader)
    wait = utts = frames = padded = n = 0
    t0 = None
    while n < steps + warmup:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(make_loader(BatchDataset(shards, batches, cfg.model.downsample), 0, cfg.data.num_workers,
                                  cfg.data.prefetch, cfg.data.pin_memory and device.type == "cuda"))
            continue
        if n == warmup:
            sync()
            t0 = time.perf_counter()
        elif n > warmup:
            wait += time.perf_counter() - t
        if n >= warmup:
            utts += batch["real"]
            frames += int(batch["lengths"].sum())
            padded += batch["feats"].shape[0] * batch["feats"].shape[1]
        out = runner([batch], seed=n)
        n += 1
    float(out["loss"])
    sync()
    total = time.perf_counter() - t0
    return {"shards": str(shards_dir), "steps": steps, "it_per_s": steps / total, "utt_per_s": utts / total,
            "audio_s_per_s": frames / 100 / total, "padding": 1 - frames / max(padded, 1),
            "data_wait": wait / total, "workers": cfg.data.num_workers, "plan_padding": stats.padding_ratio,
            **peak_memory_gb(device)}


def seed_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our rows next to the seed's published table at the same batch size (<= 400 frames)."""
    out = []
    for ref in SEED_REFERENCE:
        ours = [r for r in rows if r["batch"] == ref["batch"] and r["frames"] <= 400]
        best = max(ours, key=lambda r: r["it_per_s"]) if ours else None
        out.append({"config": f"{ref['gpu']} b{ref['batch']}", "seed_it_s": ref["it_per_s"],
                    "seed_utt_s": ref["utt_per_s"], "seed_mem_gb": ref["memory_gb"],
                    "ours_it_s": best["it_per_s"] if best else None, "ours_utt_s": best["utt_per_s"] if best else None,
                    "ours_mem_gb": (best.get("max_allocated_gb") or best.get("max_rss_gb")) if best else None,
                    "speedup_utt": best["utt_per_s"] / ref["utt_per_s"] if best else None})
    return out


COLUMNS = [("batch", "batch"), ("frames", "frames"), ("precision", "precision"), ("compile", "compile"),
           ("it_per_s", "it/s"), ("utt_per_s", "utt/s"), ("audio_s_per_s", "audio-s/s"), ("step_ms", "ms/step"),
           ("mfu", "MFU"), ("achieved_tflops", "TFLOP/s"), ("padding", "padding"), ("compile_s", "compile s")]


def bench_train(cfg: Config, out_dir: Path, device: torch.device, configs: list[tuple[int, int]], steps: int = 10,
                windows: int = 3, peak_tflops: float | None = None, name: str = "train",
                keep_runner: bool = False) -> dict[str, Any]:
    """Rows of ``bench_train_config`` beside the seed's figures; ``keep_runner``: also return the first row's
    (compiled) ``StepRunner`` under ``runner``, for a caller that measures more on it."""
    rows = [bench_train_config(cfg, b, f, device, steps, windows, peak_tflops=peak_tflops, keep_runner=keep_runner)
            for b, f in configs]
    runners = [r.pop("runner", None) for r in rows]
    mem_key = "max_allocated_gb" if device.type == "cuda" else "max_rss_gb"
    comparison = seed_comparison(rows)
    estimate = activation_estimate(cfg)
    data = {"env": environment(device), "preset": cfg.preset, "config": cfg.to_dict(), "rows": rows,
            "seed_comparison": comparison, "memory_estimate": estimate}
    note = ("" if device.type == "cuda" else "\n\nCPU run: absolute numbers describe this machine only; the seed's "
            "figures are GPU figures, so the comparison column is not meaningful here.")
    body = (f"Real optimiser step (`StepRunner`: forward, CTC loss, backward, clip, fused AdamW) on synthetic "
            f"batches, lengths uniform in [frames/2, frames]; median of {windows} windows of {steps} steps after "
            f"warm-up.\n\n" + markdown_table(rows, COLUMNS + [(mem_key, "peak memory GB")])
            + "\n\n## Against the seed's published figures (same batch, <= 400 frames)\n\n"
            + markdown_table(comparison, [("config", "config"), ("seed_it_s", "seed it/s"),
                                          ("seed_utt_s", "seed utt/s"), ("seed_mem_gb", "seed GB"),
                                          ("ours_it_s", "ours it/s"), ("ours_utt_s", "ours utt/s"),
                                          ("ours_mem_gb", "ours GB"), ("speedup_utt", "x utt/s")]) + note
            + f"\n\nMemory by estimate for preset `{cfg.preset}` (no GPU needed; `activation_estimate`): "
              f"{estimate['activations_gb']:.2f} GB of {estimate['precision']} activations at its largest planned "
              f"shape ({estimate['largest_shape']}) + {estimate['weights_grads_adam_gb']:.2f} GB of weights, "
              f"gradients and AdamW state = {estimate['total_gb']:.2f} GB.")

    def plot(fig: Any) -> None:
        ax = fig.subplots()
        labels = [f"b{r['batch']}x{r['frames']}" for r in rows]
        ax.bar(labels, [r["utt_per_s"] for r in rows], color="tab:green", label="ours")
        for ref in SEED_REFERENCE:
            ax.axhline(ref["utt_per_s"], ls="--", lw=0.8, color="gray")
            ax.text(0, ref["utt_per_s"], f"seed {ref['gpu']} b{ref['batch']}", fontsize=7, va="bottom")
        ax.set_ylabel("utterances / s")
        ax.set_yscale("log")
        ax.set_title(str(data["env"]["device"])[:70], fontsize=9)

    data["files"] = [str(p) for p in write_report(out_dir, name, "Training step throughput", data, body, plot)]
    if keep_runner:
        data["runner"] = runners[0]
    return data


def bench_scale(cfg: Config, out_dir: Path, device: torch.device, frames: int, batches: list[int],
                steps: int = 5, peak_tflops: float | None = None) -> dict[str, Any]:
    """Throughput and memory against batch size at a fixed length; stops at the first out-of-memory."""
    rows, ceiling = [], None
    for b in batches:
        try:
            rows.append(bench_train_config(cfg, b, frames, device, steps, windows=2, warmup=2,
                                           peak_tflops=peak_tflops))
        except torch.OutOfMemoryError:
            ceiling = b
            torch.cuda.empty_cache()
            break
    best = max(r["utt_per_s"] for r in rows)
    knee = next(r["batch"] for r in rows if r["utt_per_s"] >= 0.9 * best)
    mem_key = "max_allocated_gb" if device.type == "cuda" else "max_rss_gb"
    data = {"env": environment(device), "frames": frames, "rows": rows, "knee_batch": knee,
            "out_of_memory_at": ceiling}
    body = (f"Batch size sweep at {frames} frames. Knee (first batch within 10 % of the best utt/s): {knee}. "
            + (f"Out of memory at batch {ceiling}." if ceiling else "No out-of-memory in the sweep.") + "\n\n"
            + markdown_table(rows, COLUMNS + [(mem_key, "peak memory GB")]))

    def plot(fig: Any) -> None:
        ax = fig.subplots()
        ax.plot([r["batch"] for r in rows], [r["utt_per_s"] for r in rows], "o-", color="tab:green")
        ax.set(xscale="log", xlabel="batch (utterances)", ylabel="utt/s")
        ax2 = ax.twinx()
        ax2.plot([r["batch"] for r in rows], [r[mem_key] for r in rows], "s--", color="tab:red")
        ax2.set_ylabel("peak memory (GB)", color="tab:red")
        ax.axvline(knee, color="gray", lw=0.8)

    data["files"] = [str(p) for p in write_report(out_dir, "scale", "Throughput against batch size", data, body,
                                                  plot)]
    return data
