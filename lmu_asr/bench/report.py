"""Benchmark reports: every bench writes NAME.json (everything), NAME.md (a table) and NAME.png (a plot).

Reports record where they were measured (device, CPU, torch version, git commit) because a number without its
machine is not a result. CPU numbers from a shared 2-core machine are only meaningful as ratios measured side by
side in one run; the markdown says so.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmu_asr.fileio import atomic_write, atomic_write_with

# The seed project's published training figures (its README): utterances of at most 400 frames.
SEED_REFERENCE = [
    {"gpu": "RTX 4090", "batch": 48, "it_per_s": 2.0, "memory_gb": 20.0},
    {"gpu": "RTX 6000", "batch": 64, "it_per_s": 2.2, "memory_gb": 35.0},
    {"gpu": "A100", "batch": 96, "it_per_s": 3.5, "memory_gb": 55.0},
]
for _row in SEED_REFERENCE:
    _row["utt_per_s"] = _row["batch"] * _row["it_per_s"]

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) for MFU; override with --peak-tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 6000": 364.0,
                    "RTX 4090": 165.0, "A10": 125.0, "V100": 125.0}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a per-core measurement with `n` intra-op threads, then restore the caller's setting.

    Why restore: benches run in-process from the CLI and from tests; a leaked thread count changes the
    floating-point reduction order of everything that runs afterwards in that process (bit-exact resume
    checks included).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()})"


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of the device, from the table (None for CPUs and unknown GPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key.upper() in name:
            return tflops * 1e12
    return None


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        commit = out.stdout.strip()
        if not commit:
            return None
        # a measurement of uncommitted code must not be filed under the commit it started from
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | None = None) -> dict[str, Any]:
    device = device or torch.device("cpu")
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "git_commit": git_commit(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
                ) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as a markdown table; ``columns`` are (key, header) pairs; floats get sensible precision."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v == 0 or 0.01 <= abs(v) < 10_000:
                return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
            return f"{v:.3g}"
        return "" if v is None else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_report(out_dir: str | Path, name: str, title: str, data: dict[str, Any], markdown_body: str,
                 plot: Callable[[Any], None] | None = None, figsize: tuple[float, float] = (7, 3.5)) -> list[Path]:
    """Write NAME.json, NAME.md and (when matplotlib is installed) NAME.png; returns the paths written.

    ``plot(fig)`` draws on a fresh matplotlib Figure; laying it out and saving it happen here, once for all
    benches (a bare Figure, not pyplot, so no global figure state is left behind).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / f"{name}.json"
    atomic_write(path, json.dumps(data, indent=1, default=str))
    written.append(path)
    env = data.get("env", {})
    md = (f"# {title}\n\nMeasured on **{env.get('device', '?')}**, torch {env.get('torch', '?')}, "
          f"commit {env.get('git_commit') or '?'}, {env.get('time', '')}.\n\n{markdown_body.strip()}\n")
    path = out / f"{name}.md"
    atomic_write(path, md)
    written.append(path)
    if plot is not None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return written
        fig = Figure(figsize=figsize)
        plot(fig)
        fig.tight_layout()
        path = out / f"{name}.png"
        atomic_write_with(path, lambda f: fig.savefig(f, dpi=120, format="png"))
        written.append(path)
    return written
