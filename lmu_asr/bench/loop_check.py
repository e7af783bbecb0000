"""The GPU kit's ``train_loop`` stage: ``lmuasr train`` itself, end to end, on synthetic shards.

Every other stage times the step (``StepRunner``) on batches already in memory. This one runs the command a user
runs, each run in its own process: loader workers, bucketing, the warm-up compile, the metric read-out, a
checkpoint at the epoch boundary, and exact resume. That last one is what no CPU test can vouch for on a GPU:
under CUDA graphs the step's random numbers (dropout, SpecAugment) come from graph-safe generator state, and a
resumed process must replay them bit for bit. So: one straight run of ``2k`` steps, and one of ``k`` steps
resumed to ``2k``; their per-step losses are compared, the first ``k`` (same code, fresh processes: is the run
deterministic at all?) apart from the last ``k`` (the resume). On an H200 (2026-11-26) two fresh processes
already differed from step 1 (CTC's backward adds with atomics, ATen's on CUDA as ours), by at most 2.6e-5 of the
loss over 150 steps: there "exact" resume means within that run-to-run noise.

That noise grows as training goes on (a difference in the weights feeds every later step): on an H100
(2026-11-27) the resumed half differed by 2.4e-4 against 4.1e-5 before it, which a resume bug and grown noise
explain alike. Hence a control: a second straight run, whose difference from the first over steps ``k+1..2k``
is the noise the resumed run must stay within (``resume_within_noise``: its mean relative difference there at
most ``NOISE_FACTOR`` times the control's; on a deterministic device both are 0 and equality is required).
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

NOISE_FACTOR = 3.0  # two noisy runs' mean differences vary by less than this; a resume bug is a step change
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


def _relative(a: dict[int, float], b: dict[int, float], steps: list[int]) -> list[float]:
    return [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps]


def compare_losses(straight: dict[int, float], split: dict[int, float], k: int,
                   control: dict[int, float] | None = None) -> dict[str, Any]:
    """Step-by-step equality of two runs' logged losses, before the resume point and after it; with ``control``
    (a second straight run), whether the resumed half stays within the run-to-run noise of those same steps."""
    steps = sorted(straight)
    if sorted(split) != steps or (control is not None and sorted(control) != steps):
        return {"same_steps": False, "identical_before_resume": False, "identical_after_resume": False,
                "first_difference": None, "max_relative_difference": None, "max_relative_difference_before": None,
                "max_relative_difference_after": None, "resume_within_noise": False if control else None}
    diff = [s for s in steps if straight[s] != split[s]]
    before, after = [s for s in steps if s <= k], [s for s in steps if s > k]
    rel_before, rel_after = _relative(straight, split, before), _relative(straight, split, after)
    out: dict[str, Any] = {
        "same_steps": True, "identical_before_resume": all(s > k for s in diff),
        "identical_after_resume": all(s <= k for s in diff), "first_difference": diff[0] if diff else None,
        "max_relative_difference": max(rel_before + rel_after, default=0.0),
        "max_relative_difference_before": max(rel_before, default=0.0),
        "max_relative_difference_after": max(rel_after, default=0.0)}
    if control is not None:
        noise = _relative(straight, control, after)
        mean_noise, mean_after = sum(noise) / max(len(noise), 1), sum(rel_after) / max(len(rel_after), 1)
        out.update({"control_max_relative_difference_after": max(noise, default=0.0),
                    "control_mean_relative_difference_after": mean_noise,
                    "mean_relative_difference_after": mean_after,
                    "resume_within_noise": mean_after <= NOISE_FACTOR * mean_noise})
    return out


def bench_train_loop(out: Path, preset: str, sets: dict[str, Any], utterances: int, k: int,
                     frames: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """Straight run of ``2k`` steps and ``k`` + resumed ``k``; throughput of the straight run, loss equality."""
    shards = write_synthetic_shards(out / "work" / "loop_shards", utterances, 4, min_frames=frames[0],
                                    max_frames=frames[1])
    runs = out / "work" / "loop_runs"
    straight = _train(shards, runs / "straight", preset, sets, 2 * k, False, device)
    _train(shards, runs / "split", preset, sets, k, False, device)
    resumed = _train(shards, runs / "split", preset, sets, 2 * k, True, device)
    control = _train(shards, runs / "control", preset, sets, 2 * k, False, device)
    losses = {name: {r["step"]: r["loss"] for r in read_jsonl(runs / name / "log.jsonl")}
              for name in ("straight", "split", "control")}
    result = {"preset": preset, "sets": sets, "utterances": utterances, "frames": list(frames), "steps": 2 * k,
              "resume_at": k, **straight, "resumed_warmup_s": resumed["warmup_s"],
              "resumed_utt_per_s": resumed["utt_per_s"], "resumed_data_wait": resumed["data_wait"],
              "control_utt_per_s": control["utt_per_s"],
              **compare_losses(losses["straight"], losses["split"], k, losses["control"]),
              # every run's losses, so that a reader can see where two runs part (a jump, or a slow drift)
              "losses": {name: [losses[name][s] for s in sorted(losses[name])] for name in losses}}
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
        (f"max relative loss difference, steps {k + 1}-{2 * k}", "max_relative_difference_after"),
        (f"mean relative loss difference, steps {k + 1}-{2 * k}", "mean_relative_difference_after"),
        ("the same for a second straight run (run-to-run noise), max", "control_max_relative_difference_after"),
        ("... and mean", "control_mean_relative_difference_after"),
        (f"resume within the noise (mean at most {NOISE_FACTOR:g}x the control's)", "resume_within_noise"),
        ("utt/s of the second straight run", "control_utt_per_s"))]
    body = (f"`lmuasr train --preset {preset}` on {utterances} synthetic utterances of {frames[0] / 100:g}-"
            f"{frames[1] / 100:g} s, each run its own process: {2 * k} steps straight, and {k} steps then "
            f"`--resume` to {2 * k}, and a second straight run as the control for run-to-run noise.\n\n"
            + markdown_table(rows, [("what", "what"), ("value", "value")]))
    data = {"env": environment(device), **result}
    data["files"] = [str(p) for p in write_report(out, "train_loop", "lmuasr train end to end", data, body)]
    return result
