"""The ``lmuasr train --dry-run`` report: what a run would do, resolved before any step runs.

It lives apart from the training loop because nothing in it is on the hot path: it reads the trainer's
resolved config, data and model, and says which CTC and which compiled graphs the step will use, so a user
checks a cluster job's plan (and, on CUDA, whether our Triton kernels work on that GPU) before queueing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmu_asr.model.asr import count_flops

if TYPE_CHECKING:
    from lmu_asr.train.loop import Trainer


def describe(trainer: Trainer) -> str:
    """Resolved config, data found (with damage), epoch 0's plan on this rank, model size, compile and CTC."""
    batches, stats = trainer.epoch_batches(0)
    shards, m = trainer.shards, trainer.model
    flops = count_flops(m, 1, 400)
    ctc = ctc_choice(trainer)  # once: on CUDA it may run (and warn from) the Triton self-check
    lines = ["# resolved config", trainer.cfg.to_yaml().rstrip(), "", "# data",
             f"shards: {trainer.remote.spec if trainer.remote else shards.directory} "
             f"({len(shards.shard_names)} shard(s), "
             f"{len(shards)} utterances, {shards.num_frames.sum() / 360_000:.2f} h)"]
    if shards.damaged_shards:
        lines.append(f"damaged (skipped): {shards.damage_counts()} in {', '.join(shards.damaged_shards)}")
    lines += [f"epoch 0 on this rank: {stats.utterances} utterances in {len(batches)} batches, padding "
              f"{100 * stats.padding_ratio:.1f} %, skipped: {stats.skipped or 'none'}",
              f"dev: {trainer.dev_name} ({len(trainer.dev)} utterances)" if trainer.dev else "dev: none",
              "", "# model", f"parameters: {m.num_parameters():,}",
              compile_line(trainer, ctc),
              f"CTC: {ctc} (train.ctc={trainer.cfg.train.ctc}; README: The CTC)",
              f"training FLOPs per utterance of 4 s (400 frames): {flops / 1e9:.2f} GFLOP",
              f"device: {trainer.device}, world size {trainer.info.world_size} ({trainer.info.launcher})"]
    return "\n".join(lines)


def ctc_choice(trainer: Trainer) -> str:
    """What the step runs; before the runner exists (--dry-run), resolved the same way (on CUDA that runs the
    Triton self-check, so a dry run already says whether our kernels work on this GPU)."""
    from lmu_asr.train.step import resolve_ctc

    runner = getattr(trainer, "runner", None)
    return runner.ctc if runner is not None else resolve_ctc(trainer.cfg.train.ctc, trainer.device)


def compile_line(trainer: Trainer, ctc: str) -> str:
    """One line on torch.compile: off, one dynamic graph, or the static graphs compiled before the first step,
    and the compile mode, resolved as the runner resolves it from ``ctc`` (what :func:`ctc_choice` said)."""
    from lmu_asr.config import compile_enabled

    cfg = trainer.cfg
    if not compile_enabled(cfg, trainer.device.type):
        return "torch.compile: off (eager)"
    from lmu_asr.train.step import resolve_compile_mode

    runner = getattr(trainer, "runner", None)
    mode = runner.compile_mode if runner is not None else resolve_compile_mode(
        cfg, trainer.device, ctc, trainer.info.distributed)
    how = (f"; CUDA graphs (train.compile_mode={cfg.train.compile_mode}: each shape's whole step replayed by one "
           "launch)" if mode == "cudagraphs" else f"; inductor (train.compile_mode={cfg.train.compile_mode})")
    shapes = trainer.planned()
    if cfg.train.compile_shapes == "dynamic":
        return f"torch.compile: 1 graph with a dynamic time axis (covers {len(shapes)} planned shapes){how}"
    listed = ", ".join(f"{r}x{f}" for r, f in shapes[:12]) + (" ..." if len(shapes) > 12 else "")
    return (f"torch.compile: {len(shapes)} graph(s), one per planned shape (rows x frames), all compiled "
            f"before the first step: {listed}{how}")
