"""Device monitoring in the run logs: memory per logged interval (CPU here; the CUDA/NVML path with stand-ins)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch

from lmu_asr.train.metrics import DeviceMonitor
from tests.helpers import run_cli


def test_log_carries_memory_and_plot_draws_it(synth_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, output = run_cli("train", "--shards", str(synth_shards), "--out", str(run), "--preset", "cpu-tiny",
                           "--max-steps", "3", "--workers", "0", "--no-progress")
    assert code == 0, output
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(0.05 < r["rss_gb"] < 20 for r in records)
    code, output = run_cli("plot", str(run))
    assert code == 0 and (run / "curves.png").stat().st_size > 10_000


def test_cuda_path_resets_the_peak_and_reads_nvml(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3_000_000_000)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append("reset"))
    nvml = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
                                 nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monitor = DeviceMonitor(torch.device("cuda", 0))
    assert monitor.sample() == {"peak_mem_gb": 3.0, "gpu_util": 87.0} and calls == ["reset"]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: memory only, no failure
    assert DeviceMonitor(torch.device("cuda", 0)).sample() == {"peak_mem_gb": 3.0}
