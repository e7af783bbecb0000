"""``lmuasr bench model``: the LMU layer's parallel forms against its step recurrence and an LSTM of the same width.

Forward + backward of one layer (d_model = hidden = 384, order 192, as the reference design), batch 16, across
sequence lengths. The recurrence is the same layer run one frame at a time (``LMULayer.step``, what a recurrent LMU
cell computes); the LSTM is ``nn.LSTM(384, 384)`` (cuDNN / oneDNN kernels). All variants run in the same process,
interleaved per length, so the ratios are side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmu_asr.bench.report import environment, markdown_table, median_time, write_report
from lmu_asr.config import ModelConfig
from lmu_asr.model.lmu import LMULayer


def _sync(device: torch.device):  # noqa: ANN202
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _recurrent(layer: LMULayer, x: torch.Tensor) -> torch.Tensor:
    state, outs = None, []
    for t in range(x.shape[1]):
        h, state = layer.step(x[:, t], state)
        outs.append(h)
    return torch.stack(outs, dim=1)


def bench_model(out_dir: Path, lengths: list[int], batch: int = 16, device: torch.device | None = None,
                repeats: int = 3, memory_dim: int | None = None, recurrence_max: int = 3000) -> dict[str, Any]:
    device = device or torch.device("cpu")
    cfg = ModelConfig()
    C = memory_dim or cfg.lmu_memory_dim
    torch.manual_seed(0)
    layers = {mode: LMULayer(cfg.d_model, cfg.lmu_hidden, cfg.lmu_order, cfg.lmu_theta, C, mode=mode,
                             chunk=cfg.lmu_chunk).to(device) for mode in LMULayer.MODES}
    state = layers["memory"].state_dict()
    for layer in layers.values():
        layer.load_state_dict(state)
    lstm = nn.LSTM(cfg.d_model, cfg.lmu_hidden, batch_first=True).to(device)
    sync = _sync(device)
    rows = []
    for T in lengths:
        x = torch.randn(batch, T, cfg.d_model, device=device, requires_grad=True)
        timings: dict[str, float] = {}
        variants = {f"parallel ({m})": layers[m] for m in LMULayer.MODES}
        variants["lstm"] = lambda inp: lstm(inp)[0]
        if T <= recurrence_max:
            variants["recurrence"] = lambda inp: _recurrent(layers["memory"], inp)
        for name, fwd in variants.items():
            def step(fwd=fwd, x=x) -> None:  # noqa: ANN001
                fwd(x).float().square().mean().backward()

            n = 1 if name == "recurrence" and T >= 1000 else repeats
            timings[name], _ = median_time(step, repeats=n, warmup=1, sync=sync)
        best = min((v, k) for k, v in timings.items() if k.startswith("parallel"))
        row = {"frames": T, **{k: v * 1000 for k, v in timings.items()}, "best_parallel": best[1]}
        if "recurrence" in timings:
            row["speedup_vs_recurrence"] = timings["recurrence"] / best[0]
        row["speedup_vs_lstm"] = timings["lstm"] / best[0]
        rows.append(row)
    cols = [("frames", "frames")] + [(f"parallel ({m})", f"{m} ms") for m in LMULayer.MODES] + [
        ("recurrence", "recurrence ms"), ("lstm", "LSTM ms"), ("speedup_vs_recurrence", "x vs recurrence"),
        ("speedup_vs_lstm", "x vs LSTM")]
    data = {"env": environment(device), "batch": batch, "d_model": cfg.d_model, "order": cfg.lmu_order,
            "memory_dim": C, "theta": cfg.lmu_theta, "rows": rows}
    body = (f"One LMU layer, forward + backward, batch {batch}, d_model = hidden = {cfg.d_model}, order "
            f"{cfg.lmu_order}, memory channels {C}; medians of {repeats} (recurrence at >= 1000 frames: 1 run).\n\n"
            + markdown_table(rows, cols))

    def plot(fig: Any) -> None:
        ax = fig.subplots(1, 2)
        for key in [f"parallel ({m})" for m in LMULayer.MODES] + ["recurrence", "lstm"]:
            pts = [(r["frames"], r[key]) for r in rows if key in r]
            ax[0].plot(*zip(*pts, strict=True), "o-", label=key)
        ax[0].set(xscale="log", yscale="log", xlabel="frames", ylabel="ms (fwd+bwd)", title="time per layer")
        ax[0].legend(fontsize=8)
        for key, label in (("speedup_vs_recurrence", "vs step recurrence"), ("speedup_vs_lstm", "vs LSTM")):
            pts = [(r["frames"], r[key]) for r in rows if key in r]
            ax[1].plot(*zip(*pts, strict=True), "o-", label=label)
        ax[1].set(xscale="log", yscale="log", xlabel="frames", ylabel="speed-up of the best parallel form",
                  title=str(data["env"]["device"])[:60])
        ax[1].legend(fontsize=8)

    data["files"] = [str(p) for p in write_report(out_dir, "model", "LMU parallel forms vs recurrence vs LSTM",
                                                  data, body, plot, figsize=(11, 3.8))]
    return data
