"""``lmuasr bench index``: opening, planning and worker start-up at GigaSpeech-XL size (8.3 M rows, 576 shards).

A synthetic shard folder of the requested shape (``lmu_asr.bench.synthetic``: the documented ``index.parquet`` and
``meta.json``, shard files sparse at their exact sizes, no audio) is measured in fresh processes, so resident
memory is what one rank would add:

* ``cold open``: the first open of a folder that has only the contract files (it builds the index cache);
* ``warm open``: every later open (what each rank and each resume pays), resident memory added;
* ``plan``: one epoch's plan for rank 0 of ``--world`` ranks, and for a single process;
* ``worker``: the bytes a DataLoader worker is handed (pickled dataset + sampler item) and a spawned worker's
  start-up until its first batch;
* ``dry run``: ``lmuasr train --dry-run`` on the folder, end to end, in a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmu_asr.bench.report import environment, markdown_table, write_report


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def probe(folder: str, preset: str, world: int, what: str) -> dict[str, Any]:
    """One measurement in this (fresh) process; printed as JSON by ``python -m lmu_asr.bench.index``."""
    import torch

    from lmu_asr.config import load_config
    from lmu_asr.data.dataset import BatchDataset, PlanSampler, make_loader
    from lmu_asr.data.sampler import epoch_plan
    from lmu_asr.data.shards import ShardSet

    torch.set_num_threads(1)
    cfg = load_config(preset)
    before = _rss_gb()
    t = time.perf_counter()
    shards = ShardSet.open(folder)
    out: dict[str, Any] = {"open_s": time.perf_counter() - t, "open_rss_gb": _rss_gb() - before,
                           "rows": len(shards), "cache": str(shards.cache_path)}
    if what == "cold":
        return out
    t = time.perf_counter()
    batches, _ = epoch_plan(shards, cfg.data, cfg.model.downsample, 0, cfg.train.seed, 0, world)
    out["plan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    epoch_plan(shards, cfg.data, cfg.model.downsample, 0, cfg.train.seed, 0, 1)
    out["plan_single_s"] = time.perf_counter() - t
    out["after_plan_rss_gb"] = _rss_gb() - before
    dataset = BatchDataset(shards, None, cfg.model.downsample)
    out["worker_handoff_bytes"] = len(pickle.dumps(dataset)) + len(pickle.dumps(batches[0]))
    sampler = PlanSampler()
    sampler.set(batches[:1])
    loader = make_loader(dataset, num_workers=1, prefetch=1, sampler=sampler)
    loader.multiprocessing_context = "spawn"  # the costly case: everything the worker needs goes through pickle
    t = time.perf_counter()
    next(iter(loader))
    out["worker_first_batch_s"] = time.perf_counter() - t
    return out


def _run_probe(folder: Path, preset: str, world: int, what: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "lmu_asr.bench.index", str(folder), preset, str(world), what],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"index probe failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_index(out_dir: Path, sizes: list[tuple[int, int]], preset: str = "fast-h100", world: int = 8,
                keep: bool = False) -> dict[str, Any]:
    from lmu_asr.bench.synthetic import make_sparse_files, write_synthetic_shards

    rows = []
    for utterances, shards in sizes:
        folder = Path(out_dir) / "work" / f"index_{utterances}_{shards}"
        t = time.perf_counter()
        write_synthetic_shards(folder, utterances, shards, min_frames=100, max_frames=800, with_data=False)
        make_sparse_files(folder)
        built = time.perf_counter() - t
        cold = _run_probe(folder, preset, world, "cold")
        warm = _run_probe(folder, preset, world, "warm")
        t = time.perf_counter()
        dry = subprocess.run([sys.executable, "-m", "lmu_asr.cli", "train", "--shards", str(folder), "--out",
                              str(folder / "dry"), "--preset", preset, "--dry-run", "--device", "cpu"],
                             capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        rows.append({"utterances": utterances, "shards": shards, "index_mb": (folder / "index.parquet").stat().st_size
                     / 1e6, "build_s": built, "cold_open_s": cold["open_s"], "cold_open_rss_gb": cold["open_rss_gb"],
                     "open_s": warm["open_s"], "open_rss_gb": warm["open_rss_gb"], "plan_s": warm["plan_s"],
                     "plan_single_s": warm["plan_single_s"], "after_plan_rss_gb": warm["after_plan_rss_gb"],
                     "worker_handoff_mb": warm["worker_handoff_bytes"] / 1e6,
                     "worker_first_batch_s": warm["worker_first_batch_s"],
                     "dry_run_s": time.perf_counter() - t, "dry_run_ok": dry.returncode == 0})
        if not keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    data = {"env": environment(), "preset": preset, "world": world, "rows": rows,
            "goals": {"open_s": 10, "open_rss_gb": 1.0, "plan_s": 3, "worker_handoff_mb": 50}}
    body = (f"Synthetic shard folders of the given shape (sparse shards, no audio), each measured in fresh "
            f"processes. Plan: rank 0 of {world} (and one process), preset `{preset}`. Goals at XL: open <= 10 s "
            "and <= 1 GB per rank, plan <= 3 s, worker hand-off <= 50 MB.\n\n"
            + markdown_table(rows, [("utterances", "rows"), ("shards", "shards"), ("cold_open_s", "cold open s"),
                                    ("open_s", "open s"), ("open_rss_gb", "open +GB"), ("plan_s", "plan s"),
                                    ("plan_single_s", "plan s (1 rank)"), ("after_plan_rss_gb", "+GB after plan"),
                                    ("worker_handoff_mb", "worker MB"),
                                    ("worker_first_batch_s", "worker start s"), ("dry_run_s", "dry-run s")]))

    def plot(fig: Any) -> None:
        ax = fig.subplots()
        xs = [r["utterances"] for r in rows]
        for key, label in (("cold_open_s", "cold open"), ("open_s", "warm open"), ("plan_s", "plan (rank 0)"),
                           ("dry_run_s", "dry run")):
            ax.plot(xs, [r[key] for r in rows], "o-", label=label)
        ax.set(xscale="log", yscale="log", xlabel="utterances", ylabel="seconds")
        ax.legend(fontsize=8)

    data["files"] = [str(p) for p in write_report(out_dir, "index", "Index at scale", data, body, plot)]
    return data


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])))
