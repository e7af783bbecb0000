"""The ``lmuasr`` command: prep, train, eval, transcribe, bench, demo, plot.

Every subcommand turns user errors (:class:`lmu_asr.UserError`, bad config values, missing files) into one line on
stderr and exit status 2; ``--debug`` on the group shows the traceback instead. Heavy imports happen inside the
subcommands so ``lmuasr --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from lmu_asr import UserError, __version__

EXIT_USER_ERROR = 2


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a subcommand, mapping expected failures to a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as err:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().obj and ctx.find_root().obj.get("debug"):
                raise
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmuasr")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--traceback", "show_traceback", is_flag=True, help="Show Python tracebacks for user errors.")
@click.pass_context
def main(ctx: click.Context, log_level: str, show_traceback: bool) -> None:
    """lmu-asr: prep GigaSpeech into shards, train an LMU-attention CTC model fast, and prove it with numbers."""
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"debug": show_traceback}


@main.command()
@click.option("--corpus-dir", type=click.Path(path_type=Path), help="GigaSpeech root (GigaSpeech.json + audio/).")
@click.option("--subset", help="GigaSpeech subset: xs, s, m, l, xl, dev or test (any case).")
@click.option("--cuts", type=click.Path(path_type=Path), help="Any lhotse CutSet manifest instead of GigaSpeech.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory for the shards.")
@click.option("--jobs", default=1, show_default=True, help="Worker processes (one recording each at a time).")
@click.option("--shard-frames", default=6_250_000, show_default=True,
              help="Frames per shard (6.25M frames = 1 GB of float16 fbank, ~17 h of audio).")
@click.option("--shuffle-group", default=4, show_default=True,
              help="Shards shuffled together (memory: this many shards' features at a time).")
@click.option("--seed", default=0, show_default=True, help="Seed of the shuffle across shards.")
@click.option("--compress", type=click.Choice(["none", "zstd"]), default="none", show_default=True,
              help="Compress the fbank members with zstd (see README for the measured trade-off).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def prep(corpus_dir: Path | None, subset: str | None, cuts: Path | None, out: Path, jobs: int, shard_frames: int,
         shuffle_group: int, seed: int, compress: str, progress: bool) -> None:
    """Corpus -> 80-dim fbank -> WebDataset tar shards with index.parquet and meta.json (resumable)."""
    from lmu_asr.prep.pipeline import PrepOptions, run_prep, summary_lines

    opts = PrepOptions(out=out, corpus_dir=corpus_dir, subset=subset, cuts=cuts, jobs=jobs,
                       shard_frames=shard_frames, shuffle_group=shuffle_group, seed=seed,
                       compress=None if compress == "none" else compress, progress=progress,
                       command=" ".join(["lmuasr", *sys.argv[1:]]))
    meta = run_prep(opts)
    meta["out"] = str(out)
    for line in summary_lines(meta):
        click.echo(line)


@main.group()
def bench() -> None:
    """Throughput, memory and MFU benchmarks (JSON + markdown + PNG reports)."""


@bench.command("prep")
@click.option("--corpus-dir", type=click.Path(path_type=Path), help="A GigaSpeech-layout corpus.")
@click.option("--subset", default="xs", show_default=True)
@click.option("--speech-dir", type=click.Path(path_type=Path),
              help="Build a corpus of long recordings from a transcripts.tsv folder instead.")
@click.option("--out", default="bench/results", show_default=True, type=click.Path(path_type=Path))
@click.option("--max-recordings", default=4, show_default=True)
@user_errors
def bench_prep_cmd(corpus_dir: Path | None, subset: str, speech_dir: Path | None, out: Path,
                   max_recordings: int) -> None:
    """Prep throughput per core: ours vs decoding per segment vs lhotse per-cut; extractors; zstd."""
    import torch

    from lmu_asr.bench.prep import bench_prep, build_bench_corpus

    torch.set_num_threads(1)
    if corpus_dir is None:
        if speech_dir is None:
            raise UserError("give --corpus-dir (GigaSpeech layout) or --speech-dir (transcripts.tsv folder)")
        corpus_dir = build_bench_corpus(speech_dir, out / "prep_corpus")
    data = bench_prep(corpus_dir, subset, out, max_recordings)
    for row in data["approaches"]:
        click.echo(f"{row['approach']:45s} {row['audio_s_per_s']:10.1f} audio-s/s per core")
    click.echo(f"ours / naive: {data['ratio_vs_naive']:.1f}x; ours / lhotse per-cut: "
               f"{data['ratio_vs_lhotse_per_cut']:.1f}x; reports: {', '.join(data['files'])}")


if __name__ == "__main__":  # pragma: no cover
    main()
