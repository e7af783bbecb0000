"""Run logs: JSON lines (``log.jsonl`` per optimiser step, ``eval.jsonl`` per validation), TensorBoard when it is
installed, throughput accounting, and ``lmuasr plot RUN``.

``log.jsonl`` keeps the contract "one object per optimiser step with at least ``step`` (1-based) and ``loss``";
validation results go to ``eval.jsonl`` so a reader of the step log never meets a line without a loss. On resume,
lines past the checkpoint's step are dropped first, so a killed-and-resumed run logs each step exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from lmu_asr.fileio import atomic_write, atomic_write_with


class JsonlLog:
    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self._f = open(path, "a", buffering=1) if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drop records with ``step`` > ``step`` (written after the checkpoint a run resumes from)."""
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        atomic_write(path, "".join(line + "\n" for line in keep))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class TensorBoard:
    """Optional: writes scalars when the ``tensorboard`` package is installed, does nothing otherwise."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Counts utterances/frames and the time spent waiting for data between reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.utts = self.frames = self.padded = 0
        self.wait = 0.0

    def add(self, utts: int, frames: int, padded: int, wait: float) -> None:
        self.utts += utts
        self.frames += frames
        self.padded += padded
        self.wait += wait

    def rates(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"utt_per_s": self.utts / dt, "audio_s_per_s": self.frames / 100 / dt,
                "data_wait": self.wait / dt, "padding": 1 - self.frames / max(self.padded, 1)}


class DeviceMonitor:
    """Peak device memory since the last sample, and GPU utilisation, for every logged step.

    CUDA: ``torch.cuda.max_memory_allocated`` (allocator statistics: no device synchronisation), reset at each
    sample so each record holds its own interval's peak; utilisation from NVML when ``pynvml`` (PyPI
    ``nvidia-ml-py``, extra ``monitor``) is installed, else a one-time note. CPU: the process's resident memory.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.nvml = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                self._util = pynvml.nvmlDeviceGetUtilizationRates
            except Exception:  # missing package, missing driver library: utilisation is optional
                logging.getLogger(__name__).info("GPU utilisation is not logged: pip install 'lmu-asr[monitor]' "
                                                 "(nvidia-ml-py) for it")

    def sample(self) -> dict[str, float]:
        import torch

        if self.device.type == "cuda":
            out = {"peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 1e9}
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.nvml is not None:
                out["gpu_util"] = float(self._util(self.nvml).gpu)
            return out
        with open("/proc/self/statm") as f:
            return {"rss_gb": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9}


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Training loss (and dev loss / WER, device memory and utilisation when present) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = read_jsonl(run_dir / "log.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not steps:
        raise FileNotFoundError(f"{run_dir / 'log.jsonl'} has no steps to plot")
    mem_key = next((k for k in ("peak_mem_gb", "rss_gb") if any(k in r for r in steps)), None)
    panels = 1 + bool(evals) + bool(mem_key)
    fig, ax = plt.subplots(1, panels, figsize=(5.5 * panels, 3.5), squeeze=False)
    if mem_key:
        dev_ax = ax[0, panels - 1]
        pts = [(r["step"], r[mem_key]) for r in steps if mem_key in r]
        dev_ax.plot(*zip(*pts, strict=True), lw=0.8, color="tab:red")
        dev_ax.set(xlabel="step", ylabel="peak device memory (GB)" if mem_key == "peak_mem_gb" else
                   "resident memory (GB)")
        util = [(r["step"], r["gpu_util"]) for r in steps if "gpu_util" in r]
        if util:
            twin = dev_ax.twinx()
            twin.plot(*zip(*util, strict=True), lw=0.8, color="tab:blue")
            twin.set_ylabel("GPU utilisation (%)", color="tab:blue")
    ax[0, 0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train")
    if evals:
        ax[0, 0].plot([r["step"] for r in evals], [r["dev_loss"] for r in evals], "o-", label="dev")
        ax[0, 1].plot([r["step"] for r in evals], [100 * r["dev_wer"] for r in evals], "o-", label="WER")
        ax[0, 1].plot([r["step"] for r in evals], [100 * r["dev_cer"] for r in evals], "s-", label="CER")
        ax[0, 1].set_xlabel("step")
        ax[0, 1].set_ylabel("dev error (%)")
        ax[0, 1].legend()
    ax[0, 0].set_xlabel("step")
    ax[0, 0].set_ylabel("CTC loss per label")
    ax[0, 0].set_yscale("log")
    ax[0, 0].legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = out or run_dir / "curves.png"
    atomic_write_with(out, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return out
