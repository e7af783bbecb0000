"""SLURM launch: the sbatch scripts run under a stand-in srun, rank detection, preemption -> checkpoint + requeue."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmu_asr.train.dist import detect, first_slurm_host
from lmu_asr.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun: start SLURM_NTASKS copies of the command with the per-task variables srun sets
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "${@:2}" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


def test_slurm_variables_and_node_lists() -> None:
    assert first_slurm_host("gpu[003-005,010],cpu1") == "gpu003"
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a[1,2]") == "a1"
    info = detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "4242",
                   "SLURM_JOB_NODELIST": "gpu[01-02]"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.launcher) == (3, 8, 3, "gpu01",
                                                                                             "slurm")
    assert info.master_port == 20000 + 4242
    torchrun = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9",
                       "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert (torchrun.rank, torchrun.world_size, torchrun.launcher) == (1, 2, "torchrun")  # torchrun wins
    assert detect({}).world_size == 1


@pytest.mark.parametrize("script", ["train_single_gpu.sbatch", "train_multi_gpu.sbatch", "torchrun_multi_node.sh"])
def test_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / "cluster" / script)], check=True)


def test_multi_gpu_sbatch_under_a_stand_in_srun(train_shards: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    lmuasr = bin_dir / "lmuasr"
    lmuasr.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -m lmu_asr.cli \"$@\"\n")
    lmuasr.chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "777",
           "SLURM_JOB_NODELIST": "localhost", "SHARDS": str(train_shards), "RUN": str(run), "PRESET": "cpu-tiny",
           "OMP_NUM_THREADS": "1", "MIN_FREE_GB": "1000000"}
    extra = ["--max-steps", "3", "--batch-frames", "3000", "--device", "cpu"]
    res = subprocess.run(["bash", str(ROOT / "cluster" / "train_multi_gpu.sbatch"), *extra], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "pre-flight failed" in res.stderr and "✗ disk" in res.stdout  # nothing ran
    assert not (run / "log.jsonl").exists()
    env["MIN_FREE_GB"] = "0"
    res = subprocess.run(["bash", str(ROOT / "cluster" / "train_multi_gpu.sbatch"), *extra], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "✓ DDP (gloo)" in res.stdout  # the pre-flight checks ran first
    assert [r["step"] for r in read_jsonl(run / "log.jsonl")] == [1, 2, 3]
    env["PREFLIGHT"] = "0"
    extra[1] = "5"  # a requeued job runs the same script with the same flags; here it may also run longer
    res = subprocess.run(["bash", str(ROOT / "cluster" / "train_multi_gpu.sbatch"), *extra], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]  # it found last.pt and resumed
    assert [r["step"] for r in read_jsonl(run / "log.jsonl")] == [1, 2, 3, 4, 5]


def test_preemption_signal_checkpoints_and_requeues(train_shards: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "31337"}
    proc = subprocess.Popen([sys.executable, "-m", "lmu_asr.cli", "train", "--shards", str(train_shards), "--out",
                             str(run), "--preset", "cpu-tiny", "--batch-frames", "3000", "--no-progress",
                             "--max-steps", "100000", "--epochs", "1000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(read_jsonl(run / "log.jsonl")) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted" in out
    assert calls.read_text().split() == ["requeue", "31337"]
    import torch

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == read_jsonl(run / "log.jsonl")[-1]["step"]


def test_requeue_outside_slurm_does_nothing_and_a_missing_or_refusing_scontrol_only_warns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A pre-empted run must end with its checkpoint saved whatever happens to the requeue: no SLURM job, no
    call; no scontrol on PATH (a login node, a container) or one that refuses, a warning that says why and no
    exception."""
    from lmu_asr.train.dist import requeue_slurm_job

    calls = tmp_path / "calls"
    bash = shutil.which("bash")  # the PATH below holds only the stand-in, so its interpreter is named in full
    (tmp_path / "scontrol").write_text(f"#!{bash}\necho \"$@\" >> {calls}\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    requeue_slurm_job()
    assert not calls.exists()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with caplog.at_level("WARNING", logger="lmu_asr.train.dist"):
        requeue_slurm_job()
    assert calls.read_text().split() == ["requeue", "77"]
    assert "requeued SLURM job 77" in caplog.text
    caplog.clear()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level("WARNING", logger="lmu_asr.train.dist"):
        requeue_slurm_job()
    assert "could not requeue job 77" in caplog.text
    # scontrol runs but refuses (a --no-requeue job): its exit status and message, not "requeued"
    (tmp_path / "scontrol").write_text(f"#!{bash}\necho 'Requested operation is disabled for this job' >&2\n"
                                       "exit 1\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmu_asr.train.dist"):
        requeue_slurm_job()
    assert "scontrol exited 1: Requested operation is disabled for this job" in caplog.text
    assert "requeued SLURM job" not in caplog.text
