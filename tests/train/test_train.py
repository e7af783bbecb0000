"""lmuasr train on CPU: exact resume (also after kill -9), 2-rank gloo DDP via torchrun, damage, real learning."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmu_asr.data.shards import ShardSet
from lmu_asr.train.metrics import read_jsonl
from tests.helpers import run_cli

TINY = ["--preset", "cpu-tiny", "--batch-frames", "3000", "--seed", "5", "--no-progress", "--workers", "1"]


def train(shards: Path, out: Path, *extra: str) -> str:
    code, output = run_cli("train", "--shards", str(shards), "--out", str(out), *TINY, *extra)
    assert code == 0, output
    return output


def losses(run: Path) -> dict[int, float]:
    records = read_jsonl(run / "log.jsonl")
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records}


def test_max_steps_then_resume_is_bit_identical(train_shards: Path, tmp_path: Path) -> None:
    output = train(train_shards, tmp_path / "straight", "--max-steps", "8")
    rate = re.search(r"throughput: (\d+) utt/s, (\d+) audio-s/s, data wait ([\d.]+) %", output)
    assert rate and int(rate.group(1)) > 0 and int(rate.group(2)) > 0 and float(rate.group(3)) < 100, output
    train(train_shards, tmp_path / "split", "--max-steps", "4")
    assert sorted(losses(tmp_path / "split")) == [1, 2, 3, 4]
    train(train_shards, tmp_path / "split", "--max-steps", "8", "--resume")
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(straight) == list(range(1, 9))
    assert split == straight  # bit-identical floats, steps 1-8 (5-8 after the resume)


def test_compiled_training_matches_eager(train_shards: Path, tmp_path: Path) -> None:
    # compiled code draws random numbers differently (inductor's philox), so compare without dropout/SpecAugment
    quiet = ["--max-steps", "2", "--set", "model.dropout=0", "--set", "data.specaug.enabled=false"]
    train(train_shards, tmp_path / "eager", *quiet, "--no-compile")
    train(train_shards, tmp_path / "compiled", *quiet, "--compile")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_only_the_newest_epoch_checkpoints_are_kept_across_a_resume(train_shards: Path, tmp_path: Path) -> None:
    """train.keep_epoch_checkpoints=2 keeps the two latest epochs by number (a touched older file is still the
    older one), next to last.pt, and a resumed run goes on pruning."""
    run = tmp_path / "run"
    keep = ["--set", "train.keep_epoch_checkpoints=2", "--batch-frames", "12000"]
    train(train_shards, run, "--epochs", "3", *keep)
    names = lambda: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert names() == ["checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "last.pt"]
    time.sleep(0.05)
    (run / "checkpoints" / "checkpoint_epoch_1.pt").touch()  # newer file time, older epoch
    train(train_shards, run, "--epochs", "4", "--resume", *keep)
    assert names() == ["checkpoint_epoch_2.pt", "checkpoint_epoch_3.pt", "last.pt"]


def test_kill_9_mid_epoch_then_resume(train_shards: Path, tmp_path: Path) -> None:
    steps = 24
    train(train_shards, tmp_path / "reference", "--max-steps", str(steps))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmu_asr.cli", "train", "--shards", str(train_shards), "--out", str(run), *TINY,
           "--max-steps", str(steps), "--save-every", "3"]
    # same intra-op thread count as this process (the reference and the resume run here): the reduction order,
    # and so the last bit of every loss, depends on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if len(read_jsonl(run / "log.jsonl")) >= 10:
            break
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = len(read_jsonl(run / "log.jsonl"))
    assert 10 <= logged < steps, f"could not kill mid-run (logged {logged} steps)"
    code, output = run_cli("train", "--shards", str(train_shards), "--out", str(run), "--resume", "--no-progress")
    assert code == 0, output
    assert losses(run) == losses(tmp_path / "reference")
    assert not list((run / "checkpoints").glob("*.tmp"))
    epochs = {r["epoch"] for r in read_jsonl(run / "log.jsonl")}
    assert len(epochs) >= 2  # the kill and the resume crossed an epoch boundary's worth of steps


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # the probe is a script, not the package: put this checkout first on its path whatever pip installed
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


PROBE = Path(__file__).with_name("ddp_probe.py")


def test_two_rank_ddp_odd_shards_identical_params_and_exact_resume(train_shards: Path, tmp_path: Path) -> None:
    assert len(ShardSet.open(train_shards).shard_names) % 2 == 1  # an odd shard count over 2 ranks
    straight = tmp_path / "straight"
    res = torchrun(str(PROBE), str(train_shards), str(straight), "6")
    assert res.returncode == 0, res.stderr[-3000:]
    digests = [(straight / f"params_rank{r}.txt").read_text() for r in range(2)]
    assert digests[0] == digests[1]  # DDP kept the replicas identical (same gradients on both ranks)
    steps = [json.loads((straight / f"steps_rank{r}.json").read_text()) for r in range(2)]
    assert steps[0] == steps[1]  # and both took the same number of steps
    split = tmp_path / "split"
    assert torchrun(str(PROBE), str(train_shards), str(split), "3").returncode == 0
    res = torchrun(str(PROBE), str(train_shards), str(split), "6", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert losses(split) == losses(straight)
    assert (split / "params_rank0.txt").read_text() == digests[0]


def test_torchrun_cli(train_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks, with dev shards given as URLs (each rank streams a piece): every dev utterance is scored once,
    and the WER is the one a single process gets from the folder."""
    n = len(ShardSet.open(train_shards).shard_names)
    monkeypatch.setenv("LMU_ASR_CACHE", str(tmp_path / "cache"))
    dev_url = f"file:{train_shards}/shard-{{000000..{n - 1:06d}}}.tar"
    res = torchrun("-m", "lmu_asr.cli", "train", "--shards", str(train_shards), "--out", str(tmp_path / "run"),
                   *TINY, "--epochs", "1", "--dev-shards", dev_url)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_epoch_0.pt").is_file()
    (record,) = read_jsonl(tmp_path / "run" / "eval.jsonl")
    code, output = run_cli("eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "checkpoint_epoch_0.pt"),
                           "--shards", str(train_shards), "--report", str(tmp_path / "local.json"))
    local = json.loads((tmp_path / "local.json").read_text())
    assert code == 0 and record["utterances"] == local["utterances"] == len(ShardSet.open(train_shards))
    assert record["dev_wer"] == local["wer"]


def test_truncated_shard_loses_only_its_tail(train_shards: Path, tmp_path: Path, caplog) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    victim = sorted(shards.glob("shard-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    out = train(shards, tmp_path / "run", "--max-steps", "3")
    assert "truncated" in caplog.text and victim.name in caplog.text
    assert len(losses(tmp_path / "run")) == 3
    code, output = run_cli("train", "--shards", str(shards), "--out", str(tmp_path / "dry"), *TINY, "--dry-run")
    assert "past_end_of_truncated_shard" in output and victim.name in output
    line = next(x for x in output.splitlines() if x.startswith("epoch 0 on this rank"))
    from lmu_asr.data.shards import ShardSet

    clean, damaged = ShardSet.open(train_shards), ShardSet.open(shards)
    lost = int((damaged.damage > 0).sum())
    assert 0 < lost < int((clean.shard_id == 1).sum())  # the shard's head is still used
    assert f"past_end_of_truncated_shard': {lost}" in line
    del out


def test_diverging_run_stops_with_a_clear_message(train_shards: Path, tmp_path: Path) -> None:
    code, output = run_cli("train", "--shards", str(train_shards), "--out", str(tmp_path / "run"), *TINY,
                           "--lr", "1e9", "--set", "optim.grad_clip=0", "--set", "optim.warmup_steps=0",
                           "--set", "train.max_bad_steps=3", "--max-steps", "40")
    assert code == 2, output
    assert "non-finite" in output and "Traceback" not in output
    records = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert [r["non_finite"] for r in records][-3:] == [True, True, True]


def test_dry_run_and_debug(train_shards: Path, tmp_path: Path) -> None:
    code, output = run_cli("train", "--shards", str(train_shards), "--out", str(tmp_path / "dry"), *TINY,
                           "--dry-run")
    assert code == 0 and "# resolved config" in output and "parameters:" in output
    assert "utterances" in output and not (tmp_path / "dry" / "log.jsonl").exists()
    assert "CTC: aten (train.ctc=auto" in output  # auto is ATen's on a CPU
    output = train(train_shards, tmp_path / "debug", "--debug")
    assert len(losses(tmp_path / "debug")) == 3


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "4", "--batch-frames", "100"], "not both"),
    (["--preset", "warp"], "unknown preset"),
    (["--set", "model.heads=3"], "unknown config field"),
    (["--resume"], "no checkpoint"),
    (["--loader", "dali"], "dali"),
])
def test_train_user_errors(train_shards: Path, tmp_path: Path, args: list[str], message: str) -> None:
    code, output = run_cli("train", "--shards", str(train_shards), "--out", str(tmp_path / "r"), *args)
    assert code == 2 and message in output and "Traceback" not in output
