"""``lmuasr bench gpu`` (``bench/gpu.sh``): every GPU measurement in one call of at most ~8 minutes.

A GPU is lent to few sessions and for minutes, from a bare machine with a CUDA torch, numpy, pyarrow, click,
tqdm and matplotlib, and nothing else (no lhotse, webdataset, soundfile, zstandard, DALI, PyYAML, network). This
kit needs only those: the data are synthetic (``lmu_asr.bench.synthetic``), and a CI test runs ``--smoke`` under
an import blocker that makes any of the missing packages fail the run.

Stages, most important first; each is skipped (and says so in the summary) once the time budget is spent, so a
slow machine still returns the headline. Every stage writes its own NAME.json/md/png into the output folder;
``gpu_kit.json`` and ``gpu_kit.md`` summarise them.

1. ``train_a100``: the seed's A100 row (preset a100-b96: 96 x <= 400 frames, bf16, compiled) with the loop's
   read-out; 2. ``sync``: host<->device synchronisations in steady-state steps of that same compiled runner
   (``torch.cuda.set_sync_debug_mode``, each located by its Python frame); ``cudagraphs``: the same row under
   the other compile mode; ``train_loop``: ``lmuasr train`` end to end with exact resume; 3. ``train_fast_h100``: the
   fast-h100 preset at its largest shapes, against the 5.5 GB goal; 4. ``loader_synthetic``: the loader on
   synthetic shards, per worker and with DataLoader workers, against the step's consumption; 5. ``model``: the
   LMU forms at 1000/3000 frames; 6. ``compile``: static vs dynamic shapes; 7. ``scale``: batch sweep.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmu_asr.bench.report import environment, markdown_table, write_report
from lmu_asr.config import Config, load_config


def kit_configs(smoke: bool) -> dict[str, Any]:
    """Sizes of every stage: the real ones, or a CPU-sized ``--smoke`` that runs the same code in CI."""
    if smoke:
        tiny = {"train.precision": "fp32", "data.max_frames": 256, "data.buckets": "128,256"}
        return {"a100": ("cpu-tiny", {**tiny, "train.compile": "on"}, [(8, 128)]),
                "fast": ("cpu-tiny", {**tiny, "data.batch_frames": 2048}, [(16, 128), (8, 256)]),
                "model_lengths": [100, 300], "model_batch": 2, "compile_frames": [128, 256], "compile_rows": 4,
                "scale_batches": [2, 4], "loader_utts": 300, "sync_steps": 3, "steps": 2, "windows": 2,
                "ctc_shapes": [(4, 128)], "ckpt_shape": (4, 256), "budget_s": 170,
                "loop": ("cpu-tiny", {}, 200, 3, (100, 256))}
    return {"a100": ("a100-b96", {"train.precision": "bf16"}, [(96, 400)]),
            "fast": ("fast-h100", {}, [(73, 3000), (550, 400)]),  # its planned rows at 220 k frames
            "model_lengths": [1000, 3000], "model_batch": 16, "compile_frames": [128, 400, 3000],
            "compile_rows": None, "scale_batches": [48, 96, 192, 384, 768, 1536], "loader_utts": 60_000,
            "sync_steps": 10, "steps": 10, "windows": 3, "ctc_shapes": [(96, 400), (750, 400)],
            "ckpt_shape": (73, 3000), "budget_s": 460,
            # one bucket (3.3-4 s): one planned shape to compile per process; 200 steps an epoch. 2 x 200 steps:
            # the H200's 2 x 75 (1.8 s in all) was mostly CUDA-graph recording and a checkpoint, not a steady state
            "loop": ("a100-b96", {}, 19_200, 200, (330, 400))}


def count_syncs(runner: Any, batch: dict, steps: int, device: torch.device) -> dict[str, Any]:
    """Synchronising CUDA calls in ``steps`` steady-state steps (step + metric read-out), by Python location."""
    from lmu_asr.train.step import MetricReader

    reader = MetricReader(device)
    for i in range(3):  # settle: lazily created state, the first read-outs
        reader.push(runner([batch], seed=100 + i), {"step": i, "epoch": 0, "lr": 0.0, "utterances": 1})
    reader.drain()
    if device.type != "cuda":
        return {"syncs_per_step": None, "note": "CPU: no device to synchronise with (tests/train/test_step.py "
                "checks that the step reads no scalar from a step result)"}
    torch.cuda.synchronize(device)

    def run() -> None:
        for i in range(steps):
            reader.push(runner([batch], seed=200 + i), {"step": i, "epoch": 0, "lr": 0.0, "utterances": 1})

    where, stacks = record_syncs(run)
    reader.drain()
    return {"syncs_per_step": sum(where.values()) / steps, "steps": steps, "where": dict(where),
            "stacks": dict(stacks)}


def record_syncs(fn: Callable[[], Any]) -> tuple[Counter, Counter]:
    """Run ``fn`` under ``torch.cuda.set_sync_debug_mode("warn")``: its synchronisations counted by the Python
    line that raised them and by the Python stack at that moment (innermost first, 8 frames)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return record_warnings(fn, "synchroniz")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def record_warnings(fn: Callable[[], Any], match: str) -> tuple[Counter, Counter]:
    """The warnings ``fn`` raises whose text contains ``match`` (any case), C++ ones under ``torch.ops`` calls
    included (see :class:`_WarningScope`), by Python location and by stack."""
    where: Counter = Counter()
    stacks: Counter = Counter()

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if match.lower() in str(message).lower():
            where[f"{Path(filename).name}:{lineno}"] += 1
            frames = traceback.extract_stack()[:-1]
            stacks[" <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-8:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        _WarningScope.apply(fn)
    return where, stacks


class _WarningScope(torch.autograd.Function):
    """Runs a callable inside a C++ frame that hands torch's warnings to Python.

    A warning raised under a ``torch.ops`` call (ATen's CTC inside our custom op, anything an inductor graph
    calls that way) is passed to the nearest enclosing C++ warning handler, and with none it is printed to stderr
    and never reaches ``warnings``: the H200 run of 2026-11-26 counted 0 syncs for the CTC op alone that way,
    while the compiled step, which runs under autograd's ``Function.apply``, counted its 6 (tested on the CPU
    with a C++ warning). ``apply`` is such a handler; grad mode, which it turns off, is turned back on."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[], Any]) -> torch.Tensor:  # noqa: ARG004
        with torch.enable_grad():
            fn()
        return torch.zeros(())


def _loader_rates(shards: Any, cfg: Config, workers: int) -> tuple[float, float | None, float]:
    """(utt/s in one process, utt/s of the DataLoader from its first batch on, its start-up seconds)."""
    from lmu_asr.data.dataset import BatchDataset, make_loader
    from lmu_asr.data.sampler import epoch_plan

    batches, _ = epoch_plan(shards, cfg.data, cfg.model.downsample, 0, 0)
    ds = BatchDataset(shards, batches, cfg.model.downsample)
    t, utts = time.perf_counter(), 0
    for k in range(len(ds)):
        utts += ds[k]["real"]
    one = utts / (time.perf_counter() - t)
    # Steady state from the first batch on: the workers' start-up (forking, opening the shards) is reported on
    # its own. The H200 run of 2026-11-26 timed it inside a 1-second measurement and showed 8 workers slower
    # than one process.
    t, utts, first, startup = time.perf_counter(), 0, None, 0.0
    for b in make_loader(ds, 0, workers, 4, pin_memory=torch.cuda.is_available()):
        if first is None:
            startup, first = time.perf_counter() - t, time.perf_counter()
            continue
        utts += b["real"]
    many = utts / (time.perf_counter() - first) if first is not None and utts else None
    return one, many, startup


def _loader_stage(out: Path, configs: list[tuple[Config, float | None]], utterances: int) -> dict[str, Any]:
    """The loader on one synthetic shard folder, batched as each config plans, against that config's step."""
    import os

    from lmu_asr.bench.synthetic import write_synthetic_shards
    from lmu_asr.data.shards import ShardSet

    longest = min(c.data.max_frames for c, _ in configs)
    folder = write_synthetic_shards(out / "work" / "synthetic_shards", utterances, 4, min_frames=150,
                                    max_frames=longest)
    shards = ShardSet.open(folder)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    rows = []
    for cfg, step in configs:
        one, many, startup = _loader_rates(shards, cfg, workers)
        for name, rate, start in (("BatchDataset, 1 process", one, 0.0),
                                  (f"DataLoader, {workers} workers" + (", pinned" if torch.cuda.is_available()
                                                                        else ""), many, startup)):
            rows.append({"preset": cfg.preset, "loader": name, "utt_per_s": rate, "startup_s": start,
                         "step_utt_per_s": step, "over_step": rate / step if rate and step else None})
    over = [r["over_step"] for r in rows if r["loader"].startswith("DataLoader") and r["over_step"]]
    data = {"env": environment(), "utterances": utterances, "rows": rows, "workers": workers,
            "loader_over_step": min(over) if over else None}
    body = (f"Synthetic shards ({utterances} utterances of 1.5-{longest / 100:.0f} s), batched as each preset "
            "plans them; DataLoader rates from its first batch on, its start-up apart; `x step` = the loader's "
            "rate over what that preset's step consumes (from this run's train stages).\n\n"
            + markdown_table(rows, [("preset", "preset"), ("loader", "loader"), ("utt_per_s", "utt/s"),
                                    ("startup_s", "start-up s"), ("step_utt_per_s", "step utt/s"),
                                    ("over_step", "x step")]))
    data["files"] = [str(p) for p in write_report(out, "loader_synthetic", "Loader on synthetic shards", data,
                                                  body)]
    return data


STAGES = ("train_a100", "sync", "cudagraphs", "train_loop", "train_fast_h100", "loader", "model", "compile",
          "scale", "ctc", "checkpointing", "sync_bisect")


def run_kit(out: Path, device: torch.device, smoke: bool = False,
            stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    from lmu_asr.bench.compile import bench_compile
    from lmu_asr.bench.model import bench_model
    from lmu_asr.bench.train import bench_scale, bench_train

    k = kit_configs(smoke)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"env": environment(device), "smoke": smoke, "budget_s": k["budget_s"], "stages": {}}
    state: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if time.perf_counter() - t0 > k["budget_s"]:
            summary["stages"][name] = {"status": "skipped: time budget spent"}
            return
        t = time.perf_counter()
        try:
            result = fn()
            summary["stages"][name] = {"status": "ok", "seconds": time.perf_counter() - t, **result}
        except Exception as err:  # one failing stage must not cost the others their results
            summary["stages"][name] = {"status": f"failed: {type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc(limit=6)}
        print(f"[bench gpu] {name}: {summary['stages'][name]['status']} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        # A summary after every stage: a call cut off by its time limit still returns what was measured.
        write_summary(out, {**summary, "seconds": time.perf_counter() - t0})

    def a100() -> dict[str, Any]:
        preset, sets, shapes = k["a100"]
        cfg = load_config(preset, None, sets)
        data = bench_train(cfg, out, device, shapes, k["steps"], k["windows"], name="train_a100",
                           keep_runner=True)
        r = data["rows"][0]
        state["runner"], state["step_utt"] = data.pop("runner"), r["utt_per_s"]
        state["cfg"], state["shape"], state["mode"] = cfg, shapes[0], r["compile_mode"]
        return {"utt_per_s": r["utt_per_s"], "it_per_s": r["it_per_s"], "mfu": r["mfu"],
                "peak_gb": r.get("max_allocated_gb") or r.get("max_rss_gb"), "compile_s": r["compile_s"],
                "vs_seed_a100": r["utt_per_s"] / 336.0, "ctc": r["ctc"], "compile_mode": r["compile_mode"]}

    def sync() -> dict[str, Any]:
        from lmu_asr.train.step import synthetic_batch

        rows, frames = state["shape"]
        return count_syncs(state["runner"], synthetic_batch(rows, frames, seed=5), k["sync_steps"], device)

    def cudagraphs() -> dict[str, Any]:
        """The seed's A100 row again under the compile mode that ``train_a100`` did not run: CUDA graphs
        (``mode="reduce-overhead"``) against inductor's default, side by side. ``train.compile_mode=auto`` picks
        CUDA graphs on one GPU with the Triton CTC (then the whole step is one graph), so on a GPU this stage
        measures the default mode it replaced; on a CPU (smoke) it runs the CUDA-graph code path."""
        from lmu_asr.bench.train import bench_train_config
        from lmu_asr.train.step import synthetic_batch

        preset, sets, shapes = k["a100"]
        rows, frames = shapes[0]
        other = "default" if state.get("mode") == "cudagraphs" else "cudagraphs"
        cfg = load_config(preset, None, {**sets, "train.compile_mode": other})
        torch._dynamo.reset()
        r = bench_train_config(cfg, rows, frames, device, k["steps"], k["windows"], keep_runner=True)
        syncs = count_syncs(r.pop("runner"), synthetic_batch(rows, frames, seed=5), k["sync_steps"], device)
        base = state.get("step_utt")
        graphs, plain = (r["utt_per_s"], base) if other == "cudagraphs" else (base, r["utt_per_s"])
        return {"mode": other, "utt_per_s": r["utt_per_s"], "it_per_s": r["it_per_s"], "step_ms": r["step_ms"],
                "peak_gb": r.get("max_allocated_gb") or r.get("max_rss_gb"), "compile_s": r["compile_s"],
                "cudagraphs_over_default": graphs / plain if graphs and plain else None, "ctc": r["ctc"],
                "syncs_per_step": syncs["syncs_per_step"], "sync_stacks": syncs.get("stacks")}

    def train_loop() -> dict[str, Any]:
        from lmu_asr.bench.loop_check import bench_train_loop

        preset, sets, utterances, steps, frames = k["loop"]
        result = bench_train_loop(out, preset, sets, utterances, steps, frames, device)
        result.pop("losses")  # per-step losses stay in train_loop.json
        return result

    def fast() -> dict[str, Any]:
        preset, sets, shapes = k["fast"]
        data = bench_train(load_config(preset, None, sets), out, device, shapes, k["steps"], k["windows"],
                           name="train_fast_h100")
        short = [r for r in data["rows"] if r["frames"] <= 400]  # the loader stage's shards are <= 4 s
        state["fast_step_utt"] = short[0]["utt_per_s"] if short else None
        return {"rows": [{f: r.get(f) for f in ("batch", "frames", "utt_per_s", "audio_s_per_s", "mfu",
                                                 "max_allocated_gb", "max_rss_gb")} for r in data["rows"]],
                "memory_estimate_gb": data["memory_estimate"]["total_gb"]}

    def loader() -> dict[str, Any]:
        configs = [(load_config(k["a100"][0], None, k["a100"][1]), state.get("step_utt")),
                   (load_config(k["fast"][0], None, k["fast"][1]), state.get("fast_step_utt"))]
        data = _loader_stage(out, configs, k["loader_utts"])
        return {"rows": data["rows"], "loader_over_step": data["loader_over_step"]}

    def model() -> dict[str, Any]:
        data = bench_model(out, k["model_lengths"], k["model_batch"], device, recurrence_max=1000)
        return {"rows": [{f: r.get(f) for f in ("frames", "best_parallel", "speedup_vs_recurrence",
                                                 "speedup_vs_lstm")} for r in data["rows"]]}

    def compile_() -> dict[str, Any]:
        preset, sets, _ = k["fast"]
        data = bench_compile(load_config(preset, None, sets), out, device, k["compile_frames"], k["compile_rows"],
                             ("static", "dynamic"))
        return {"totals": data["totals"]}

    def scale() -> dict[str, Any]:
        preset, sets, shapes = k["a100"]
        cfg = load_config(preset, None, {**sets, "train.compile_shapes": "dynamic"})
        data = bench_scale(cfg, out, device, shapes[0][1], k["scale_batches"])
        return {"knee_batch": data["knee_batch"], "out_of_memory_at": data["out_of_memory_at"]}

    def ctc() -> dict[str, Any]:
        from lmu_asr.bench.ctc_probe import bench_ctc

        preset, sets, _ = k["a100"]
        data = bench_ctc(out, load_config(preset, None, sets), device, k["ctc_shapes"], k["steps"], 2)
        return {"op_rows": data["op_rows"], "step_rows": data["step_rows"]}

    def checkpointing() -> dict[str, Any]:
        from lmu_asr.bench.ctc_probe import bench_checkpointing

        preset, sets, _ = k["fast"]
        return {"rows": bench_checkpointing(out, load_config(preset, None, sets), device, k["ckpt_shape"],
                                            k["steps"], 2)["rows"]}

    def sync_bisect() -> dict[str, Any]:
        from lmu_asr.bench.ctc_probe import bench_sync_bisect

        preset, sets, shapes = k["a100"]
        rows = bench_sync_bisect(out, load_config(preset, None, sets), device, shapes[0], k["sync_steps"])["rows"]
        return {"rows": [{f: r[f] for f in ("variant", "syncs_per_step", "step_ms", "top_stack")} for r in rows]}

    for name, fn in (("train_a100", a100), ("sync", sync), ("cudagraphs", cudagraphs),
                     ("train_loop", train_loop), ("train_fast_h100", fast), ("loader", loader), ("model", model),
                     ("compile", compile_), ("scale", scale), ("ctc", ctc), ("checkpointing", checkpointing),
                     ("sync_bisect", sync_bisect)):
        if name not in stages:
            continue
        if name == "sync" and "runner" not in state:
            summary["stages"][name] = {"status": "skipped: needs train_a100"}
            continue
        stage(name, fn)
    state.pop("runner", None)
    summary["seconds"] = time.perf_counter() - t0
    write_summary(out, summary)
    return summary


def write_summary(out: Path, summary: dict[str, Any]) -> list[Path]:
    rows = [{"stage": name, "status": s["status"].split(":")[0], "seconds": s.get("seconds")}
            for name, s in summary["stages"].items()]
    a100 = summary["stages"].get("train_a100", {})
    sync = summary["stages"].get("sync", {})
    head = []
    if summary["smoke"]:
        head.append("Smoke run: every stage at CPU size to check the kit end to end; no number here is a GPU "
                    "measurement.")
    elif a100.get("status") == "ok":
        head.append(f"Seed's A100 row (b96 x <= 400 frames): **{a100['utt_per_s']:.0f} utt/s** "
                    f"({a100['vs_seed_a100']:.1f}x the seed's 336), {a100['it_per_s']:.2f} it/s, peak "
                    f"{a100['peak_gb']:.2f} GB, MFU {100 * (a100['mfu'] or 0):.1f} % (compile mode "
                    f"{a100.get('compile_mode')}, CTC {a100.get('ctc')}).")
    loop = summary["stages"].get("train_loop", {})
    if loop.get("status") == "ok":
        head.append(f"`lmuasr train` end to end ({loop['preset']}, {loop['steps']} steps): "
                    f"{loop['utt_per_s'] or 0:.0f} utt/s, data wait {100 * (loop['data_wait'] or 0):.1f} %; "
                    f"a straight run against one resumed at step {loop['resume_at']}: losses identical before "
                    f"the resume {loop['identical_before_resume']}, after it {loop['identical_after_resume']} (max "
                    f"relative difference {loop['max_relative_difference_before']:.2g} before, "
                    f"{loop['max_relative_difference_after']:.2g} after; a second straight run differs by "
                    f"{loop.get('control_max_relative_difference_after') or 0:.2g} after it: resume within the "
                    f"run-to-run noise {loop.get('resume_within_noise')}).")
    if sync.get("status") == "ok" and sync.get("syncs_per_step") is not None:
        head.append(f"Host-device synchronisations per steady-state step: {sync['syncs_per_step']:.1f} "
                    f"({sync['where'] or 'none'}).")
    body = ("\n\n".join(head) + "\n\n" if head else "") + markdown_table(
        rows, [("stage", "stage"), ("status", "status"), ("seconds", "seconds")])
    for name, s in summary["stages"].items():
        if s["status"].startswith("failed"):
            body += f"\n\n{name}: {s['status']}"
    return write_report(out, "gpu_kit", "GPU kit summary" + (" (smoke, CPU)" if summary["smoke"] else ""),
                        summary, body)
