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

import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lmu_asr.bench.report import SEED_REFERENCE, environment, markdown_table, peak_flops, write_report
from lmu_asr.config import Config
from lmu_asr.data.specaug import SpecAugment
from lmu_asr.model.asr import LMUASR, count_flops
from lmu_asr.train.dist import DistInfo
from lmu_asr.train.step import StepRunner


def synthetic_batch(batch: int, frames: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(frames // 2, frames + 1, (batch,), generator=g)
    feats = torch.randn(batch, frames, 80, generator=g).to(torch.float16)
    feats *= (torch.arange(frames)[None, :] < lengths[:, None])[..., None]
    tlens = lengths // 7  # ~14 characters per second of speech
    targets = torch.randint(3, 29, (batch, frames // 2), generator=g)
    targets *= torch.arange(frames // 2)[None, :] < tlens[:, None]
    return {"feats": feats, "lengths": lengths, "targets": targets, "target_lengths": tlens, "real": batch,
            "skipped": 0}


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
    """(seconds of the first step incl. compile, median seconds per step, per-window step times)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    out = runner([batches[0]], seed=1)
    float(out["loss"])
    sync()
    first = time.perf_counter() - t
    for i in range(max(warmup - 1, 0)):
        runner([batches[i % len(batches)]], seed=i)
    sync()
    per_step = []
    for w in range(windows):
        t = time.perf_counter()
        for i in range(steps):
            out = runner([batches[(w * steps + i) % len(batches)]], seed=i)
        float(out["loss"])
        sync()
        per_step.append((time.perf_counter() - t) / steps)
    return first, statistics.median(per_step), per_step


def bench_train_config(cfg: Config, batch: int, frames: int, device: torch.device, steps: int = 10,
                       windows: int = 3, warmup: int = 3, peak_tflops: float | None = None) -> dict[str, Any]:
    """Throughput of one configuration on synthetic batches (static shape, as the bucketed loader gives)."""
    torch.manual_seed(0)
    model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug))
    flops_step = count_flops(model, batch, frames)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = StepRunner(model, cfg, device, DistInfo(), total_steps=10_000)
    batches = [synthetic_batch(batch, frames, seed=s) for s in range(4)]
    first, step_s, windows_s = time_steps(runner, batches, steps, windows, device, warmup)
    real_frames = statistics.mean(int(b["lengths"].sum()) for b in batches)
    peak = peak_flops(device, peak_tflops) or (cpu_matmul_peak() if device.type == "cpu" else None)
    return {"batch": batch, "frames": frames, "precision": cfg.train.precision, "compile": runner.compiled,
            "lmu_mode": cfg.model.lmu_mode, "it_per_s": 1 / step_s, "utt_per_s": batch / step_s,
            "audio_s_per_s": real_frames / 100 / step_s, "frames_per_s": real_frames / step_s,
            "padding": 1 - real_frames / (batch * frames), "step_ms": 1000 * step_s,
            "window_step_ms": [1000 * w for w in windows_s], "first_step_s": first,
            "compile_s": first - step_s if runner.compiled else 0.0, "flops_per_step": flops_step,
            "gflops_per_utt": flops_step / batch / 1e9, "achieved_tflops": flops_step / step_s / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": flops_step / step_s / peak if peak else None,
            "peak_basis": "device table (bf16 dense)" if device.type == "cuda" or peak_tflops else
            "measured fp32 matmul on this CPU", **peak_memory_gb(device)}


def bench_train_shards(cfg: Config, shards_dir: Path, device: torch.device, steps: int = 30,
                       warmup: int = 3) -> dict[str, Any]:
    """The real loader feeding the real step: throughput, padding and the fraction of time spent waiting for data."""
    from lmu_asr.data.dataset import BatchDataset, make_loader
    from lmu_asr.data.sampler import epoch_plan
    from lmu_asr.data.shards import ShardSet

    shards = ShardSet.open(shards_dir)
    torch.manual_seed(0)
    model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug))
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
                windows: int = 3, peak_tflops: float | None = None, name: str = "train") -> dict[str, Any]:
    rows = [bench_train_config(cfg, b, f, device, steps, windows, peak_tflops=peak_tflops) for b, f in configs]
    mem_key = "max_allocated_gb" if device.type == "cuda" else "max_rss_gb"
    comparison = seed_comparison(rows)
    data = {"env": environment(device), "preset": cfg.preset, "config": cfg.to_dict(), "rows": rows,
            "seed_comparison": comparison}
    note = ("" if device.type == "cuda" else "\n\nCPU run: absolute numbers describe this machine only; the seed's "
            "figures are GPU figures, so the comparison column is not meaningful here.")
    body = (f"Real optimiser step (`StepRunner`: forward, CTC loss, backward, clip, fused AdamW) on synthetic "
            f"batches, lengths uniform in [frames/2, frames]; median of {windows} windows of {steps} steps after "
            f"warm-up.\n\n" + markdown_table(rows, COLUMNS + [(mem_key, "peak memory GB")])
            + "\n\n## Against the seed's published figures (same batch, <= 400 frames)\n\n"
            + markdown_table(comparison, [("config", "config"), ("seed_it_s", "seed it/s"),
                                          ("seed_utt_s", "seed utt/s"), ("seed_mem_gb", "seed GB"),
                                          ("ours_it_s", "ours it/s"), ("ours_utt_s", "ours utt/s"),
                                          ("ours_mem_gb", "ours GB"), ("speedup_utt", "x utt/s")]) + note)

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
