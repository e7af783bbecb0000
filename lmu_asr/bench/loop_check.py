"""The GPU kit's ``train_loop`` stage: ``lmuasr train`` itself, end to end, on synthetic shards.

Every other stage times the step (``StepRunner``) on batches already in memory. This one runs the command a user
runs, each run in its own process: loader workers, bucketing, the warm-up compile, the metric read-out, a
checkpoint at the epoch boundary, and exact resume. That last one is what no CPU test can vouch for on a GPU:
under CUDA graphs the step's random numbers (dropout, SpecAugment) come from graph-safe generator state, and a
resumed process must replay them bit for bit. So: one straight run of ``2k`` steps, and one of ``k`` steps
resumed to ``2k``; their per-step losses are compared, the first ``k`` (same code, fresh processes: is the run
deterministic at all?) apart from the last ``k`` (the resume). On an H200 (2026-11-26) two fresh processes
already differed from step 1 (CTC's backward adds with atomics, ATen's on CUDA as ours), by at most 2.6e-5 of the
loss over 150 steps: there "exact" resume means within that run-to-run noise, and the two halves' differences
tell a resume bug (a jump after ``k``) from it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lmu_asr.bench.report import environment, markdown_table, write_report
from lmu_asr.bench.synthetic import write_synthetic_shards
from lmu_asr.train.metrics import read_jsonl

_RATE = re.compile(r"throughput: (\S+) utt/s, (\S+) audio-s/s, data wait (\S+) %")


def _train(shards: Path, run: Path, preset: str, sets: dict[str, Any], steps: int, resume: bool,
           device: torch.device) -> dict:
    """One ``lmuasr train`` process; its throughput line, parsed (the CLI's own figures, warm-up excluded)."""
    cmd = [sys.executable, "-m", "lmu_asr.cli", "train", "--shards", str(shards), "--out", str(run),
           "--preset", preset, "--device", device.type, "--max-steps", str(steps), "--seed", "5", "--no-progress"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"lmuasr train exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    found = _RATE.search(proc.stdout)
    compiled = re.search(r"compiled the train step for (\d+) planned shape\(s\) in (\S+) s", proc.stderr)
    return {"utt_per_s": float(found.group(1)) if found else None,
            "audio_s_per_s": float(found.group(2)) if found else None,
            "data_wait": float(found.group(3)) / 100 if found else None,
            "warmup_s": float(compiled.group(2)) if compiled else None}


def compare_losses(straight: dict[int, float], split: dict[int, float], k: int) -> dict[str, Any]:
    """Step-by-step equality of two runs' logged losses: before the resume point and after it."""
    steps = sorted(straight)
    if sorted(split) != steps:
        return {"same_steps": False, "identical_before_resume": False, "identical_after_resume": False,
                "first_difference": None, "max_relative_difference": None, "max_relative_difference_before": None,
                "max_relative_difference_after": None}
    diff = [s for s in steps if straight[s] != split[s]]

    def worst(part: list[int]) -> float:
        return max((abs(straight[s] - split[s]) / max(abs(straight[s]), 1e-12) for s in part), default=0.0)

    before, after = [s for s in steps if s <= k], [s for s in steps if s > k]
    return {"same_steps": True, "identical_before_resume": all(s > k for s in diff),
            "identical_after_resume": all(s <= k for s in diff), "first_difference": diff[0] if diff else None,
            "max_relative_difference": worst(steps), "max_relative_difference_before": worst(before),
            "max_relative_difference_after": worst(after)}


def bench_train_loop(out: Path, preset: str, sets: dict[str, Any], utterances: int, k: int,
                     frames: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """Straight run of ``2k`` steps and ``k`` + resumed ``k``; throughput of the straight run, loss equality."""
    shards = write_synthetic_shards(out / "work" / "loop_shards", utterances, 4, min_frames=frames[0],
                                    max_frames=frames[1])
    runs = out / "work" / "loop_runs"
    straight = _train(shards, runs / "straight", preset, sets, 2 * k, False, device)
    _train(shards, runs / "split", preset, sets, k, False, device)
    resumed = _train(shards, runs / "split", preset, sets, 2 * k, True, device)
    losses = {name: {r["step"]: r["loss"] for r in read_jsonl(runs / name / "log.jsonl")}
              for name in ("straight", "split")}
    result = {"preset": preset, "sets": sets, "utterances": utterances, "frames": list(frames), "steps": 2 * k,
              "resume_at": k, **straight, "resumed_warmup_s": resumed["warmup_s"],
              "resumed_utt_per_s": resumed["utt_per_s"], "resumed_data_wait": resumed["data_wait"],
              **compare_losses(losses["straight"], losses["split"], k)}
    rows = [{"what": name, "value": result[key]} for name, key in (
        ("utt/s (straight run, from its first step on)", "utt_per_s"), ("audio-s/s", "audio_s_per_s"),
        ("data wait (share of the loop's time)", "data_wait"),
        (f"utt/s of the resumed process (steps {k + 1}-{2 * k})", "resumed_utt_per_s"),
        ("its data wait", "resumed_data_wait"), ("warm-up compile s", "warmup_s"),
        ("warm-up compile s after resume", "resumed_warmup_s"),
        (f"losses identical, steps 1-{k} (fresh processes)", "identical_before_resume"),
        (f"losses identical, steps {k + 1}-{2 * k} (after the resume)", "identical_after_resume"),
        ("first differing step", "first_difference"),
        (f"max relative loss difference, steps 1-{k}", "max_relative_difference_before"),
        (f"max relative loss difference, steps {k + 1}-{2 * k}", "max_relative_difference_after"))]
    body = (f"`lmuasr train --preset {preset}` on {utterances} synthetic utterances of {frames[0] / 100:g}-"
            f"{frames[1] / 100:g} s, each run its own process: {2 * k} steps straight, and {k} steps then "
            f"`--resume` to {2 * k}.\n\n" + markdown_table(rows, [("what", "what"), ("value", "value")]))
    data = {"env": environment(device), **result}
    data["files"] = [str(p) for p in write_report(out, "train_loop", "lmuasr train end to end", data, body)]
    return result
