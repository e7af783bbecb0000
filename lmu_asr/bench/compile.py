"""``lmuasr bench compile``: what torch.compile does with the train step, per shape, from dynamo's own counters.

For each requested padded length (rows from the preset's batching, or ``--rows``) the real ``StepRunner`` step is
run once (compiling if needed) and then timed: per shape the report gives the graphs dynamo built, the graph
breaks with their reasons, recompiles (a shape that compiled a code object dynamo had already compiled), the
compile time (first step minus a steady step) and the steady step time. ``--shapes both`` measures the two
strategies side by side on the same shapes: ``static`` (one graph per shape, the default, all compiled before
training) and ``dynamic`` (one graph with a symbolic time axis).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from lmu_asr.bench.report import environment, markdown_table, write_report
from lmu_asr.config import Config, set_field
from lmu_asr.data.sampler import capacity
from lmu_asr.data.specaug import SpecAugment
from lmu_asr.model.asr import LMUASR
from lmu_asr.train.dist import DistInfo
from lmu_asr.train.step import StepRunner, synthetic_batch


def _snapshot() -> dict[str, Any]:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["ok"],
            "breaks": dict(counters["graph_break"])}


def measure(cfg: Config, device: torch.device, frames_list: list[int], rows: int | None = None,
            steps: int = 3) -> list[dict[str, Any]]:
    """Per-shape compile facts for one strategy (``cfg.train.compile_shapes``), in a fresh dynamo state."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug), max_frames=max(max(frames_list),
                                                                                    cfg.data.max_frames))
    runner = StepRunner(model, cfg, device, DistInfo(), total_steps=10_000)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out, seen = [], 0
    for frames in frames_list:
        n_rows = rows or capacity(cfg.data, frames)
        batch = synthetic_batch(n_rows, frames, seed=frames)
        before = _snapshot()
        t = time.perf_counter()
        runner([batch], seed=1)
        sync()
        first = time.perf_counter() - t
        times = []
        for i in range(steps):
            t = time.perf_counter()
            runner([batch], seed=2 + i)
            sync()
            times.append(time.perf_counter() - t)
        after = _snapshot()
        step_s = statistics.median(times)
        new_frames = after["frames"] - before["frames"]
        breaks = {k: v - before["breaks"].get(k, 0) for k, v in after["breaks"].items()
                  if v > before["breaks"].get(k, 0)}
        out.append({"strategy": cfg.train.compile_shapes, "rows": n_rows, "frames": frames,
                    "graphs": after["graphs"] - before["graphs"], "graph_breaks": sum(breaks.values()),
                    "graph_break_reasons": breaks, "recompiles": new_frames if seen else 0,
                    "compile_s": max(0.0, first - step_s), "step_ms": 1000 * step_s,
                    "after_steady_steps_graphs": _snapshot()["graphs"] - after["graphs"]})
        seen += 1
    return out


def bench_compile(cfg: Config, out_dir: Any, device: torch.device, frames_list: list[int], rows: int | None = None,
                  strategies: tuple[str, ...] = ("static",), steps: int = 3) -> dict[str, Any]:
    cfg.train.compile = "on"
    rows_all = []
    for strategy in strategies:
        set_field(cfg, "train.compile_shapes", strategy)
        rows_all += measure(cfg, device, frames_list, rows, steps)
    totals = {s: {"graphs": sum(r["graphs"] for r in rows_all if r["strategy"] == s),
                  "graph_breaks": sum(r["graph_breaks"] for r in rows_all if r["strategy"] == s),
                  "compile_s": sum(r["compile_s"] for r in rows_all if r["strategy"] == s),
                  "mean_step_ms": statistics.mean(r["step_ms"] for r in rows_all if r["strategy"] == s)}
              for s in strategies}
    data = {"env": environment(device), "preset": cfg.preset, "frames": frames_list, "rows": rows_all,
            "totals": totals, "config": cfg.to_dict()}
    reasons = sorted({k for r in rows_all for k in r["graph_break_reasons"]})
    body = ("The real train step (`StepRunner`), compiled, per padded length; counts from `torch._dynamo`'s "
            "counters. compile s = first step minus a steady step.\n\n"
            + markdown_table(rows_all, [("strategy", "strategy"), ("rows", "rows"), ("frames", "frames"),
                                        ("graphs", "graphs"), ("graph_breaks", "graph breaks"),
                                        ("recompiles", "recompiles"), ("compile_s", "compile s"),
                                        ("step_ms", "step ms")])
            + "\n\n" + markdown_table([{"strategy": k, **v} for k, v in totals.items()],
                                      [("strategy", "strategy"), ("graphs", "graphs"),
                                       ("graph_breaks", "graph breaks"), ("compile_s", "compile s (sum)"),
                                       ("mean_step_ms", "mean step ms")])
            + ("\n\nGraph-break reasons: " + "; ".join(reasons) if reasons else "\n\nNo graph breaks."))

    def plot(fig: Any) -> None:
        ax = fig.subplots()
        for s in strategies:
            rs = [r for r in rows_all if r["strategy"] == s]
            ax.plot([r["frames"] for r in rs], [r["compile_s"] for r in rs], "o-", label=f"{s}: compile s")
            ax.plot([r["frames"] for r in rs], [r["step_ms"] / 1000 for r in rs], "s--", label=f"{s}: step s")
        ax.set(xlabel="padded frames", ylabel="seconds", yscale="log")
        ax.legend(fontsize=7)

    data["files"] = [str(p) for p in write_report(out_dir, "compile", "torch.compile of the train step", data, body,
                                                  plot)]
    return data
