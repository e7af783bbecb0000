"""Where am I? Rank, world size and rendezvous from torchrun or SLURM, detected in this one place.

* ``torchrun`` (single or multi-node with ``--rdzv-endpoint``) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT: used as is.
* ``srun`` under ``sbatch`` sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and SLURM_JOB_NODELIST: the master is
  the first host of the node list, the port is derived from the job id (so two jobs on a node do not collide).
* otherwise: a single process.

NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[003-005,010],cpu1" -> "gpu003"; "n1,n2" -> "n1"."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect(env: dict[str, str] | None = None) -> DistInfo:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                        env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                        int(env.get("MASTER_PORT") or 20000 + job % 20000), "slurm")
    return DistInfo()


def select_device(info: DistInfo, requested: str = "auto") -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (no-op for a single process)."""
    if not info.distributed or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, **kwargs)
    global _CONTROL
    # host-side agreement (step counts, the preemption flag) over gloo on CPU tensors: with NCCL such a scalar
    # would round-trip through the GPU stream and make the host wait for every queued kernel
    _CONTROL = dist.new_group(backend="gloo") if backend == "nccl" else None


_CONTROL = None


def shutdown() -> None:
    global _CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def _reduce(values: list[float], op: dist.ReduceOp, dtype: torch.dtype) -> list[float]:
    t = torch.tensor(values, dtype=dtype)  # on the host: never waits for the device
    dist.all_reduce(t, op=op, group=_CONTROL)
    return t.tolist()


def all_reduce_min(value: int, device: torch.device | None = None) -> int:
    """The minimum over ranks of a host integer (``device`` is accepted for old callers; unused)."""
    if not dist.is_initialized():
        return value
    return int(_reduce([value], dist.ReduceOp.MIN, torch.int64)[0])


def all_reduce_max(value: int) -> int:
    if not dist.is_initialized():
        return value
    return int(_reduce([value], dist.ReduceOp.MAX, torch.int64)[0])


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    if not dist.is_initialized():
        return values
    return _reduce(values, dist.ReduceOp.SUM, torch.float64)


def all_gather_objects(obj: object) -> list[object]:
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue after a pre-emption signal (``sbatch --signal``), so it resumes from
    the checkpoint just written. Outside a SLURM job it does nothing. When ``scontrol`` cannot run or refuses
    (a job submitted with ``--no-requeue``, a cluster that forbids it), a warning gives its exit status and
    message, so nobody waits for a requeue that never comes; the caller goes on either way (its checkpoint is
    already saved)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], check=False, timeout=30, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not requeue job %s: %s", job, err)
        return
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        log.warning("could not requeue job %s: scontrol exited %d%s", job, done.returncode,
                    f": {why[-1]}" if why else "")
        return
    log.warning("requeued SLURM job %s", job)
