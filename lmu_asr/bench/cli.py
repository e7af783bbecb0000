"""``lmuasr bench``: the benchmark commands (each writes NAME.json, NAME.md and NAME.png; see lmu_asr/bench/)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lmu_asr import UserError
from lmu_asr.cli_common import POS, _overrides, int_list, resolve_device, user_errors


@click.group()
def bench() -> None:
    """Throughput, memory and MFU benchmarks (JSON + markdown + PNG reports)."""




@bench.command("model")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@click.option("--lengths", default="100,300,1000,3000", show_default=True, help="Sequence lengths (frames).")
@click.option("--batch", default=16, show_default=True, type=POS)
@click.option("--memory-dim", type=POS, help="LMU input channels (default: the reference design's).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@user_errors
def bench_model_cmd(out: Path, lengths: str, batch: int, memory_dim: int | None, device: str) -> None:
    """LMU parallel forms vs the step recurrence vs nn.LSTM, forward+backward, across lengths."""
    from lmu_asr.bench.model import bench_model

    data = bench_model(out, int_list(lengths, "--lengths"), batch, resolve_device(device), memory_dim=memory_dim)
    for r in data["rows"]:
        click.echo(f"{r['frames']:5d} frames: best {r['best_parallel']:18s} x{r.get('speedup_vs_recurrence', 0):6.1f}"
                   f" vs recurrence, x{r['speedup_vs_lstm']:5.1f} vs LSTM")
    click.echo("reports: " + ", ".join(data["files"]))


def _bench_cfg(preset: str, precision: str | None, compile_: bool | None, sets: tuple[str, ...]):  # noqa: ANN202
    from lmu_asr.config import load_config

    return load_config(preset, None, _overrides(sets, **{
        "train.precision": precision, "train.compile": None if compile_ is None else ("on" if compile_ else "off")}))


@bench.command("train")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@click.option("--preset", default="default", show_default=True)
@click.option("--batch", "batches", multiple=True, type=POS, help="Batch sizes (default: 48, 64, 96 as the seed).")
@click.option("--frames", default=400, show_default=True, type=click.IntRange(min=2), help="Padded length (the seed's limit: 400).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--compile/--no-compile", "compile_", default=None)
@click.option("--set", "sets", multiple=True, help="Config overrides, as for train.")
@click.option("--steps", default=10, show_default=True, type=POS, help="Steps per timed window.")
@click.option("--windows", default=3, show_default=True, type=POS, help="Timed windows (the median is reported).")
@click.option("--shards", type=click.Path(path_type=Path), help="Also run the real loader on these shards.")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), help="Device peak for MFU (default: built-in table).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@user_errors
def bench_train_cmd(out: Path, preset: str, batches: tuple[int, ...], frames: int, precision: str | None,
                    compile_: bool | None, sets: tuple[str, ...], steps: int, windows: int, shards: Path | None,
                    peak_tflops: float | None, device: str) -> None:
    """Training-step throughput, memory and MFU, beside the seed's published figures."""
    import json

    from lmu_asr.bench.train import bench_train, bench_train_shards
    from lmu_asr.fileio import atomic_write

    cfg = _bench_cfg(preset, precision, compile_, sets)
    dev = resolve_device(device)
    data = bench_train(cfg, out, dev, [(b, frames) for b in (batches or (48, 64, 96))], steps, windows,
                       peak_tflops)
    est = data["memory_estimate"]
    click.echo(f"memory estimate, preset {cfg.preset}: {est['activations_gb']:.2f} GB of {est['precision']} "
               f"activations at {est['largest_shape']} + {est['weights_grads_adam_gb']:.2f} GB weights/grads/AdamW "
               f"= {est['total_gb']:.2f} GB")
    for r in data["rows"]:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] else "n/a"
        click.echo(f"b{r['batch']} x {r['frames']}: {r['it_per_s']:.2f} it/s, {r['utt_per_s']:.0f} utt/s, "
                   f"{r['audio_s_per_s']:.0f} audio-s/s, MFU {mfu}")
    if shards is not None:
        real = bench_train_shards(cfg, shards, dev)
        atomic_write(out / "train_shards.json", json.dumps(real, indent=1))
        click.echo(f"real shards: {real['utt_per_s']:.0f} utt/s, data wait {100 * real['data_wait']:.1f} %, "
                   f"padding {100 * real['padding']:.1f} %")
    click.echo("reports: " + ", ".join(data["files"]))


@bench.command("scale")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@click.option("--preset", default="default", show_default=True)
@click.option("--frames", default=400, show_default=True, type=click.IntRange(min=2))
@click.option("--batches", default="16,32,64,128,256,512,1024,2048", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--compile/--no-compile", "compile_", default=None)
@click.option("--set", "sets", multiple=True)
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True))
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@user_errors
def bench_scale_cmd(out: Path, preset: str, frames: int, batches: str, precision: str | None,
                    compile_: bool | None, sets: tuple[str, ...], peak_tflops: float | None, device: str) -> None:
    """Throughput and memory against batch size (find the knee and the memory ceiling; meant for GPUs)."""
    from lmu_asr.bench.train import bench_scale

    cfg = _bench_cfg(preset, precision, compile_, sets)
    data = bench_scale(cfg, out, resolve_device(device), frames, int_list(batches, "--batches"),
                       peak_tflops=peak_tflops)
    click.echo(f"knee at batch {data['knee_batch']}; out of memory at {data['out_of_memory_at'] or 'none'}")
    click.echo("reports: " + ", ".join(data["files"]))


@bench.command("gpu")
@click.option("--out", default="bench/results/gpu", show_default=True, type=click.Path(path_type=Path))
@click.option("--smoke", is_flag=True, help="The same stages at CPU size (CI): checks the kit, measures nothing.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--stages", default="all", show_default=True,
              help="Comma-separated subset of: train_a100, sync, cudagraphs, train_loop, train_fast_h100, loader, "
                   "model, compile, scale, ctc, checkpointing, sync_bisect (sync needs train_a100).")
@user_errors
def bench_gpu_cmd(out: Path, smoke: bool, device: str, stages: str) -> None:
    """Every GPU measurement in one call of <= 8 minutes (bench/gpu.sh): train, syncs, memory, loader, compile."""
    from lmu_asr.bench.gpu import STAGES, run_kit

    dev = resolve_device(device)
    if dev.type != "cuda" and not smoke:
        raise UserError("bench gpu needs a CUDA device (use --smoke to check the kit on a CPU)")
    chosen = STAGES if stages == "all" else tuple(s.strip() for s in stages.split(",") if s.strip())
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise UserError(f"--stages: unknown stage {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(STAGES)}")
    summary = run_kit(out, dev, smoke, chosen)
    failed = [n for n, s in summary["stages"].items() if s["status"].startswith("failed")]
    click.echo(f"{len(summary['stages'])} stages in {summary['seconds']:.0f} s; reports in {out}"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


@bench.command("index")
@click.option("--utterances", default="100000,1000000,8280000", show_default=True,
              help="Rows of each synthetic index (comma-separated; 8.28 M is GigaSpeech XL).")
@click.option("--shards", "shard_counts", default="8,70,576", show_default=True,
              help="Shard files of each (comma-separated, one per --utterances value).")
@click.option("--preset", default="fast-h100", show_default=True)
@click.option("--world", default=8, show_default=True, type=POS, help="Ranks the plan is split over.")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@click.option("--keep", is_flag=True, help="Keep the synthetic folders under OUT/work/.")
@user_errors
def bench_index_cmd(utterances: str, shard_counts: str, preset: str, world: int, out: Path, keep: bool) -> None:
    """Open, plan and worker start-up on a synthetic index of GigaSpeech-XL size (no audio)."""
    from lmu_asr.bench.index import bench_index

    counts, shard_list = int_list(utterances, "--utterances"), int_list(shard_counts, "--shards")
    if len(counts) != len(shard_list):
        raise UserError("give one --shards value per --utterances value")
    data = bench_index(out, list(zip(counts, shard_list, strict=True)), preset, world, keep)
    for r in data["rows"]:
        click.echo(f"{r['utterances']:>9,} rows / {r['shards']} shards: open {r['open_s']:.2f} s "
                   f"(+{r['open_rss_gb']:.2f} GB; first open {r['cold_open_s']:.1f} s), plan {r['plan_s']:.2f} s, "
                   f"worker {r['worker_handoff_mb']:.2f} MB / {r['worker_first_batch_s']:.1f} s, dry-run "
                   f"{r['dry_run_s']:.1f} s")
    click.echo("reports: " + ", ".join(data["files"]))


@bench.command("prep-plan")
@click.option("--segments", default="100000,300000,1000000", show_default=True,
              help="Sizes of the synthetic GigaSpeech.json (comma-separated; XL has 8.28 M segments).")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@click.option("--keep", is_flag=True, help="Keep the synthetic corpora and prep folders under OUT/work/.")
@user_errors
def bench_prep_plan_cmd(segments: str, out: Path, keep: bool) -> None:
    """Prep's bookkeeping (validation, lhotse manifests, planning, index assembly) against corpus size."""
    from lmu_asr.bench.prep_scale import bench_prep_plan

    data = bench_prep_plan(out, int_list(segments, "--segments"), keep)
    for r in data["rows"]:
        click.echo(f"{r['segments']:>9,} segments: {r['total_s']:.1f} s ({r['us_per_segment']:.0f} µs each), "
                   f"peak {r['peak_rss_gb']:.2f} GB")
    click.echo("growth exponents: " + ", ".join(f"{k} {v:.2f}" for k, v in data["growth_exponent"].items()))
    click.echo("reports: " + ", ".join(data["files"]))


@bench.command("compile")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@click.option("--preset", default="default", show_default=True)
@click.option("--frames", default="128,400,3000", show_default=True, help="Padded lengths (frames), one shape each.")
@click.option("--rows", type=POS, help="Rows per batch (default: the preset's batching for each length).")
@click.option("--shapes", default="static", show_default=True, type=click.Choice(["static", "dynamic", "both"]),
              help="Compile strategy to measure (both: side by side).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--set", "sets", multiple=True)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@user_errors
def bench_compile_cmd(out: Path, preset: str, frames: str, rows: int | None, shapes: str, precision: str | None,
                      sets: tuple[str, ...], device: str) -> None:
    """Graphs, graph breaks, recompiles and compile time of the train step per shape (dynamo's counters)."""
    from lmu_asr.bench.compile import bench_compile

    cfg = _bench_cfg(preset, precision, True, sets)
    strategies = ("static", "dynamic") if shapes == "both" else (shapes,)
    data = bench_compile(cfg, out, resolve_device(device), int_list(frames, "--frames", 2), rows, strategies)
    for r in data["rows"]:
        click.echo(f"{r['strategy']:7s} {r['rows']:5d} x {r['frames']:5d}: {r['graphs']} graph(s), "
                   f"{r['graph_breaks']} break(s), {r['recompiles']} recompile(s), compile {r['compile_s']:.1f} s, "
                   f"step {r['step_ms']:.1f} ms")
    click.echo("reports: " + ", ".join(data["files"]))


@bench.command("loader")
@click.option("--corpus-dir", type=click.Path(path_type=Path), help="A GigaSpeech-layout corpus.")
@click.option("--subset", default="xs", show_default=True)
@click.option("--speech-dir", type=click.Path(path_type=Path), help="Or build one from a transcripts.tsv folder.")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@user_errors
def bench_loader_cmd(corpus_dir: Path | None, subset: str, speech_dir: Path | None, out: Path) -> None:
    """Loader throughput per worker: our shards vs the seed's per-utterance decoding vs lhotse's pipeline."""
    from lmu_asr.bench.loader import bench_loader
    from lmu_asr.bench.prep import build_bench_corpus
    from lmu_asr.prep.pipeline import PrepOptions, run_prep

    if corpus_dir is None:
        if speech_dir is None:
            raise UserError("give --corpus-dir (GigaSpeech layout) or --speech-dir (transcripts.tsv folder)")
        corpus_dir = build_bench_corpus(speech_dir, out / "work" / "prep_corpus")
    shards = out / "work" / "loader_shards"
    run_prep(PrepOptions(out=shards, corpus_dir=corpus_dir, subset=subset, progress=False))
    data = bench_loader(corpus_dir, subset, shards, out)
    for r in data["rows"]:
        click.echo(f"{r['loader'][:60]:60s} {r['utt_per_s']:9.0f} utt/s per worker")
    click.echo(f"ours / seed: {data['ratio_vs_seed']:.0f}x; ours / lhotse: {data['ratio_vs_lhotse']:.1f}x")
    click.echo("reports: " + ", ".join(data["files"]))


@bench.command("prep")
@click.option("--corpus-dir", type=click.Path(path_type=Path), help="A GigaSpeech-layout corpus.")
@click.option("--subset", default="xs", show_default=True)
@click.option("--speech-dir", type=click.Path(path_type=Path),
              help="Build a corpus of long recordings from a transcripts.tsv folder instead.")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@click.option("--max-recordings", default=4, show_default=True, type=POS)
@user_errors
def bench_prep_cmd(corpus_dir: Path | None, subset: str, speech_dir: Path | None, out: Path,
                   max_recordings: int) -> None:
    """Prep throughput per core: ours vs decoding per segment vs lhotse per-cut; extractors; zstd."""
    from lmu_asr.bench.prep import bench_prep, build_bench_corpus
    from lmu_asr.bench.report import torch_threads

    if corpus_dir is None:
        if speech_dir is None:
            raise UserError("give --corpus-dir (GigaSpeech layout) or --speech-dir (transcripts.tsv folder)")
        corpus_dir = build_bench_corpus(speech_dir, out / "work" / "prep_corpus")
    with torch_threads(1):
        data = bench_prep(corpus_dir, subset, out, max_recordings)
    for row in data["approaches"]:
        click.echo(f"{row['approach']:45s} {row['audio_s_per_s']:10.1f} audio-s/s per core")
    click.echo(f"ours / naive: {data['ratio_vs_naive']:.1f}x; ours / lhotse per-cut: "
               f"{data['ratio_vs_lhotse_per_cut']:.1f}x; reports: {', '.join(data['files'])}")


