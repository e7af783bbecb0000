"""``lmuasr doctor``: check the environment before a long job, one line per check with the fix when it fails.

What breaks GPU training jobs an hour in is mostly the environment: a CPU-only torch on a GPU node, no bf16 on
an older GPU, a compiler toolchain torch.compile cannot use, NCCL or gloo that cannot form a process group,
a missing optional package (DALI, opus support in soundfile), a full disk where checkpoints go, a tiny
``/dev/shm`` (DataLoader workers hand batches over through it) or a low open-file limit (every worker opens
every shard). Each check is ``ok``, ``fail`` (required: exit 1) or ``warn`` (works, but worth fixing), with the
fix; ``--json`` for machines. ``cluster/`` runs it as a pre-flight step (``PREFLIGHT=0`` skips it).
"""

from __future__ import annotations

import importlib
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# (module, what needs it, what installs it): the base install's are required, the extras' are advice
PACKAGES = (("pyarrow", "shard index", "lmu-asr"), ("lhotse", "prep", "lmu-asr"),
            ("webdataset", "URL shards", "lmu-asr"), ("nvidia.dali", "--loader dali", "lmu-asr[dali]"),
            ("onnxruntime", "lmuasr export", "lmu-asr[export]"))


@dataclass
class Check:
    name: str
    status: str  # ok | fail | warn
    detail: str
    fix: str = ""


def _version(module: str) -> str | None:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception:  # any import failure means "not usable here"
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, backend: str, result: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    if rank == 0:
        Path(result).write_text(str(float(t[0])))
    dist.destroy_process_group()


def ddp_smoke(backend: str, world: int = 2) -> Check:
    """Two processes form a process group and all-reduce: what every multi-GPU run does first."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        result = os.path.join(d, "sum")
        t = time.perf_counter()
        try:
            mp.spawn(_ddp_worker, args=(world, _free_port(), backend, result), nprocs=world, join=True)
            got = float(Path(result).read_text())
        except Exception as err:  # process-group failures come in many types
            return Check(f"DDP ({backend})", "fail", f"{world} processes could not all-reduce: "
                         f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:120] if str(err) else ''}",
                         "check the network interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME) and firewall")
    expected = world * (world + 1) / 2
    if got != expected:
        return Check(f"DDP ({backend})", "fail", f"all-reduce gave {got}, expected {expected}")
    return Check(f"DDP ({backend})", "ok", f"{world} processes all-reduced in {time.perf_counter() - t:.1f} s")


def compile_smoke(device: str) -> Check:
    import torch

    t = time.perf_counter()
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T) + 1)
        x = torch.randn(8, 8, device=device)
        ok = torch.allclose(fn(x), torch.nn.functional.gelu(x @ x.T) + 1, atol=1e-4)
    except Exception as err:  # inductor reports toolchain problems as many exception types
        return Check(f"torch.compile ({device})", "fail" if device == "cuda" else "warn",
                     f"{type(err).__name__}: {str(err).strip().splitlines()[0][:140] if str(err) else ''}",
                     "install a C++ compiler (gcc/g++) and, for CUDA, a matching Triton; or train with --no-compile")
    if not ok:
        return Check(f"torch.compile ({device})", "fail", "the compiled function gives other numbers than eager")
    return Check(f"torch.compile ({device})", "ok", f"compiled and ran in {time.perf_counter() - t:.1f} s")


def run_checks(paths: list[Path], min_free_gb: float = 20.0, quick: bool = False) -> list[Check]:
    import torch

    out = []
    py = sys.version_info
    out.append(Check("Python", "ok" if py >= (3, 10) else "fail", platform.python_version(),
                     "" if py >= (3, 10) else "use Python 3.10 or newer"))
    cuda = torch.cuda.is_available()
    detail = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
    if cuda:
        detail += f", cuDNN {torch.backends.cudnn.version()}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
    out.append(Check("PyTorch", "ok", detail))
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            bf16 = torch.cuda.is_bf16_supported()
            out.append(Check(f"GPU {i}", "ok" if bf16 else "warn", f"{p.name}, {p.total_memory / 1e9:.0f} GB, "
                             f"bf16 {'yes' if bf16 else 'no'}", "" if bf16 else "use --precision fp16 (GradScaler)"))
    else:
        out.append(Check("GPU", "warn" if torch.version.cuda else "ok",
                         "none visible" + (" (CUDA build, but no device)" if torch.version.cuda else
                                           ": this torch is CPU-only; training runs on the CPU"),
                         "check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi)" if torch.version.cuda else ""))
    if not quick:
        out.append(compile_smoke("cuda" if cuda else "cpu"))
        out.append(ddp_smoke("gloo"))
        if cuda and torch.cuda.device_count() >= 2:
            out.append(ddp_smoke("nccl"))
    for module, why, install in PACKAGES:
        v = _version(module)
        required = install == "lmu-asr"
        out.append(Check(module, "ok" if v else ("fail" if required else "warn"),
                         f"{v} ({why})" if v else f"not installed ({why})", "" if v else f"pip install '{install}'"))
    out.append(_soundfile())
    for path in paths:
        target = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
        free = shutil.disk_usage(target).free / 1e9
        out.append(Check(f"disk {path}", "ok" if free >= min_free_gb else "fail", f"{free:.0f} GB free",
                         "" if free >= min_free_gb else "free space (checkpoints, shards) or pass --min-free-gb"))
    if os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        shm = st.f_blocks * st.f_frsize / 1e9
        out.append(Check("/dev/shm", "ok" if shm >= 2 else "warn", f"{shm:.1f} GB (DataLoader workers pass batches "
                         "through it)", "" if shm >= 2 else "docker run --shm-size=16g, or remount /dev/shm larger"))
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out.append(Check("open files", "ok" if soft >= 4096 else "warn", f"ulimit -n {soft} (workers open every shard)",
                     "" if soft >= 4096 else "ulimit -n 65536 (or raise it in /etc/security/limits.conf)"))
    return out


def _soundfile() -> Check:
    try:
        import soundfile as sf
    except Exception:  # a missing libsndfile as well as a missing package
        return Check("soundfile", "fail", "not importable (audio decoding for prep)", "pip install soundfile")
    opus = "OPUS" in sf.available_subtypes("OGG")
    return Check("soundfile", "ok" if opus else "fail", f"{sf.__version__}, libsndfile {sf.__libsndfile_version__}, "
                 f"Ogg/Opus {'yes' if opus else 'no'} (GigaSpeech audio is opus)",
                 "" if opus else "pip install --upgrade soundfile (its wheel bundles a libsndfile with opus)")


def format_checks(checks: list[Check]) -> list[str]:
    mark = {"ok": "✓", "fail": "✗", "warn": "!"}
    return [f"{mark[c.status]} {c.name}: {c.detail}" + (f" — fix: {c.fix}" if c.fix and c.status != "ok" else "")
            for c in checks]


def as_json(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]
