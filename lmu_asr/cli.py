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
POS = click.IntRange(min=1)  # click names the valid range in its message and exits 2
NONNEG = click.IntRange(min=0)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a subcommand, mapping expected failures to a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, OSError) as err:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().obj and ctx.find_root().obj.get("debug"):
                raise
            if isinstance(err, OSError) and not isinstance(err, UserError):
                # permission denied, disk full, file too large, read-only filesystem...: what failed, and where
                from lmu_asr.fileio import os_error_message

                msg = os_error_message(err)
            else:
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
@click.option("--jobs", default=1, show_default=True, type=POS, help="Worker processes (one recording each at a time).")
@click.option("--shard-frames", default=6_250_000, show_default=True, type=click.IntRange(min=1000),
              help="Frames per shard (6.25M frames = 1 GB of float16 fbank, ~17 h of audio).")
@click.option("--shuffle-group", default=4, show_default=True, type=POS,
              help="Shards shuffled together (memory: this many shards' features at a time).")
@click.option("--seed", default=0, show_default=True, type=NONNEG, help="Seed of the shuffle across shards.")
@click.option("--compress", type=click.Choice(["none", "zstd"]), default="none", show_default=True,
              help="Compress the fbank members with zstd (see README for the measured trade-off).")
@click.option("--plan-only", is_flag=True,
              help="Validate, read the corpus and plan the shards; print counts and timings; decode nothing.")
@click.option("--reindex", is_flag=True,
              help="Only (re)build OUT's index cache (.index-cache-v1.arrow) from its index.parquet, then stop.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def prep(corpus_dir: Path | None, subset: str | None, cuts: Path | None, out: Path, jobs: int, shard_frames: int,
         shuffle_group: int, seed: int, compress: str, plan_only: bool, reindex: bool, progress: bool) -> None:
    """Corpus -> 80-dim fbank -> WebDataset tar shards with index.parquet and meta.json (resumable)."""
    from lmu_asr.prep.pipeline import PrepOptions, run_prep, summary_lines

    if reindex:
        import time

        from lmu_asr.data.shards import ShardSet

        t = time.perf_counter()
        shards = ShardSet.open(out, rebuild_cache=True)
        click.echo(f"index cache of {len(shards):,} utterances in {len(shards.shard_names)} shard(s) written to "
                   f"{shards.cache_path} in {time.perf_counter() - t:.1f} s")
        return

    opts = PrepOptions(out=out, corpus_dir=corpus_dir, subset=subset, cuts=cuts, jobs=jobs,
                       shard_frames=shard_frames, shuffle_group=shuffle_group, seed=seed,
                       compress=None if compress == "none" else compress, progress=progress,
                       command=" ".join(["lmuasr", *sys.argv[1:]]), plan_only=plan_only)
    meta = run_prep(opts)
    if plan_only:
        click.echo(f"plan: {meta['segments']:,} segments in {meta['recordings']:,} recordings ({meta['hours']:.1f} h), "
                   f"{meta['rejected']:,} rejected; {meta['groups']} group(s) of {meta['shards']} shard(s)")
        click.echo("timings: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in meta["timings"].items()))
        return
    meta["out"] = str(out)
    for line in summary_lines(meta):
        click.echo(line)


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """``"100,300,1000"`` -> [100, 300, 1000], or a one-line error naming the flag and the valid range."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise UserError(f"{flag}: every value must be an integer >= {minimum}, got {text!r}")
    return values


def _overrides(pairs: tuple[str, ...], **flags: object) -> dict[str, object]:
    """``--set section.field=value`` pairs plus the explicitly given flags (None = not given)."""
    out: dict[str, object] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects section.field=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


@main.command()
@click.option("--shards", required=True,
              help="Training shards: a prep folder, or webdataset URLs (https://host/shard-{000000..000099}.tar, "
                   "pipe:CMD, file:PATH) with index.parquet and meta.json beside them.")
@click.option("--dev-shards", type=click.Path(path_type=Path), help="Validation shards (loss, WER each epoch).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--preset", default=None, help="Configuration preset (see config.py); default: 'default'.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML file of config overrides.")
@click.option("--set", "sets", multiple=True, help="Override any field: --set model.dropout=0.2 (repeatable).")
@click.option("--epochs", type=POS)
@click.option("--max-steps", type=POS, help="Stop after this many optimiser steps in total.")
@click.option("--save-every", type=NONNEG, help="Write checkpoints/last.pt every N steps (0: only at the end).")
@click.option("--batch-size", type=POS, help="Fixed utterances per batch (the seed's mode).")
@click.option("--batch-frames", type=POS, help="Frame budget per batch (dynamic batch size).")
@click.option("--max-frames", type=POS, help="Skip (and count) longer utterances.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True))
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the train step (default: on for CUDA, off on CPU where eager is faster).")
@click.option("--loader", type=click.Choice(["wds", "dali"]))
@click.option("--workers", type=NONNEG, help="DataLoader worker processes.")
@click.option("--seed", type=NONNEG)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt exactly.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config, the data found and the model size.")
@click.option("--debug", is_flag=True, help="Run 3 steps, eagerly, with extra checks.")
@click.option("--progress/--no-progress", default=True)
@user_errors
def train(shards: str, dev_shards: Path | None, out: Path, preset: str | None, config_file: Path | None,
          sets: tuple[str, ...], epochs: int | None, max_steps: int | None, save_every: int | None,
          batch_size: int | None, batch_frames: int | None, max_frames: int | None, lr: float | None,
          precision: str | None, compile_: bool | None, loader: str | None, workers: int | None, seed: int | None,
          device: str, resume: bool, dry_run: bool, debug: bool, progress: bool) -> None:
    """Train the LMU-attention CTC model on shards (alone, under torchrun, or under SLURM)."""
    from lmu_asr.config import config_from_dict, load_config, set_field, validate
    from lmu_asr.train.checkpoint import load
    from lmu_asr.train.loop import Trainer

    if batch_size is not None and batch_frames is not None:
        raise UserError("give --batch-size or --batch-frames, not both")
    overrides = _overrides(sets, **{
        "train.epochs": epochs, "train.max_steps": max_steps, "train.save_every": save_every,
        "data.batch_size": batch_size, "data.batch_frames": batch_frames, "data.max_frames": max_frames,
        "optim.lr": lr, "train.precision": precision,
        "train.compile": None if compile_ is None else ("on" if compile_ else "off"), "train.loader": loader,
        "data.num_workers": workers, "train.seed": seed})
    if batch_frames is not None:
        overrides["data.batch_size"] = 0
    last = out / "checkpoints" / "last.pt"
    if resume and not last.is_file():
        raise UserError(f"--resume: no checkpoint at {last}")
    if resume and preset is None and config_file is None:
        cfg = config_from_dict(load(last)["config"])  # continue with the run's own config
        for k, v in overrides.items():
            set_field(cfg, k, v)
        validate(cfg)
    else:
        cfg = load_config(preset or "default", config_file, overrides)
    from lmu_asr.data.stream import is_url

    source: str | Path = shards if is_url(shards) else Path(shards)
    trainer = Trainer(cfg, source, out, dev_shards, resume=resume, device=device, debug=debug, progress=progress)
    if dry_run:
        click.echo(trainer.describe())
        return
    result = trainer.run()
    click.echo(f"{result['reason']}: step {result['step']}, epoch {result['epoch']}, "
               f"{result['seconds']:.0f} s" + (f", best dev WER {100 * result['best_wer']:.2f} %"
                                                if result["best_wer"] != float("inf") else "")
               + (f" ({result['dev_unreadable']} dev utterance(s) unreadable, not scored)"
                  if result["dev_unreadable"] else "")
               + (f", {result['non_finite_steps']} non-finite step(s) skipped" if result["non_finite_steps"]
                  else "")
               + (f", {result['damaged_samples']} damaged sample(s) skipped (see {out / 'damaged.jsonl'})"
                  if result["damaged_samples"] else ""))
    click.echo(f"checkpoints: {out / 'checkpoints'}")


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--shards", required=True, type=click.Path(path_type=Path))
@click.option("--beam", default=0, show_default=True, type=NONNEG, help="Prefix beam width (0: greedy).")
@click.option("--report", type=click.Path(path_type=Path), help="JSON report path (default: beside the checkpoint).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@user_errors
def eval_cmd(checkpoint: Path, shards: Path, beam: int, report: Path | None, device: str) -> None:
    """WER/CER (GigaSpeech scoring) of a checkpoint on a shard set; writes a JSON report."""
    import json

    import torch

    from lmu_asr.data.shards import ShardSet
    from lmu_asr.fileio import atomic_write as atomic_write_text
    from lmu_asr.train.checkpoint import model_from_checkpoint
    from lmu_asr.train.evaluate import evaluate

    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    model, cfg = model_from_checkpoint(checkpoint, dev)
    res = evaluate(model, ShardSet.open(shards), cfg, dev, beam=beam, keep_hyps=True)
    report = report or checkpoint.parent / f"eval_{shards.resolve().name}_{'beam' + str(beam) if beam > 1 else 'greedy'}.json"
    atomic_write_text(report, json.dumps({"checkpoint": str(checkpoint), "shards": str(shards), **res}, indent=1))
    click.echo(f"WER {100 * res['wer']:.2f} %  CER {100 * res['cer']:.2f} %  ({res['utterances']} utterances, "
               f"{res['ref_words']} words, {'beam ' + str(beam) if beam > 1 else 'greedy'})")
    click.echo(f"report: {report}")
    lost = res["damaged"]
    if lost["count"]:  # a score over part of the set: said, and not a success
        click.echo(f"error: {lost['count']} of {res['index_utterances']} utterances could not be read and are not "
                   f"scored ({', '.join(f'{k} {v}' for k, v in lost['by_reason'].items())}; keys in the report)",
                   err=True)
        sys.exit(1)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--beam", default=0, show_default=True, type=NONNEG, help="Prefix beam width (0: greedy).")
@click.option("--streaming", is_flag=True, help="Decode chunk by chunk with the LMU step form (causal models).")
@click.option("--chunk-frames", default=32, show_default=True, type=POS, help="Frames per streaming chunk (10 ms each).")
@click.option("--device", default="cpu", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@user_errors
def transcribe(checkpoint: Path, files: tuple[Path, ...], beam: int, streaming: bool, chunk_frames: int,
               device: str) -> None:
    """Print PATH<TAB>TEXT per audio file (wav/flac/opus..., any sample rate). Exit 1 if a file failed."""
    import torch

    from lmu_asr.infer import transcribe_files
    from lmu_asr.train.checkpoint import model_from_checkpoint

    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    model, _ = model_from_checkpoint(checkpoint, dev)
    if streaming:
        model.encoder.stream_init()  # raises a clear error for full-attention models
    failed = 0
    for path, text, error in transcribe_files(model, list(files), beam, streaming, chunk_frames):
        if error is not None:
            failed += 1
            click.echo(f"error: {error}", err=True)
        else:
            click.echo(f"{path}\t{text}")
    if failed:
        sys.exit(1)


@main.command()
@click.option("--subset", required=True, help="xs, s, m, l, xl, dev or test (any case).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Corpus folder (GigaSpeech layout).")
@click.option("--password", envvar="GIGASPEECH_PASSWORD", help="From GigaSpeech's owners (or $GIGASPEECH_PASSWORD).")
@click.option("--host", default="tsinghua", show_default=True,
              help="Mirror: tsinghua, speechocean, magicdata, or an http(s):// URL laid out like a release.")
@user_errors
def download(subset: str, out: Path, password: str | None, host: str) -> None:
    """Download GigaSpeech (lhotse's downloader, speechcolab underneath): md5-checked, resumable."""
    from lmu_asr.prep.download import download as run_download

    res = run_download(subset, out, password or "", host)
    click.echo(f"GigaSpeech {subset.upper()} in {out}: {res['gb_on_disk']:.2f} GB on disk, {res['seconds']:.0f} s; "
               f"next: lmuasr prep --corpus-dir {out} --subset {subset.lower()} --out SHARDS")


@main.command()
@click.argument("shards", required=False, type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Verify a checkpoint instead (or as well).")
@click.option("--report", type=click.Path(path_type=Path), help="JSON report (default: SHARDS/verify.json).")
@click.option("--progress/--no-progress", default=True)
@user_errors
def verify(shards: Path | None, checkpoint: Path | None, report: Path | None, progress: bool) -> None:
    """Read every member of every shard once and check it against the index; or check a checkpoint. Exit 1 if
    anything is damaged."""
    import json

    from lmu_asr.fileio import atomic_write
    from lmu_asr.verify import verify_checkpoint, verify_shards

    if shards is None and checkpoint is None:
        raise UserError("give a shard folder (lmuasr verify SHARDS) or --checkpoint CK")
    bad = False
    if shards is not None:
        res = verify_shards(shards, progress)
        click.echo(f"{res['ok']:,} of {res['utterances']:,} utterances intact in {res['shards']} shard(s); "
                   f"{res['gb_read']:.2f} GB read in {res['seconds']:.1f} s ({res['gb_per_s']:.2f} GB/s)")
        click.echo(f"feature statistics vs meta.json: mean within {res['stats']['max_mean_diff']:.1e}, std within "
                   f"{100 * res['stats']['max_std_rel_diff']:.3f} %")
        if res["damaged"]:
            bad = True
            click.echo(f"damaged: {res['damaged']:,} ({', '.join(f'{k} {v}' for k, v in res['by_reason'].items())})")
            for e in res["examples"][:10]:
                click.echo(f"  {e['key']}: {e['reason']}: {e['detail']}")
        path = report or shards / "verify.json"
        try:
            atomic_write(path, json.dumps(res, indent=1))
        except OSError:
            if report is not None:
                raise
            path = Path(f"verify_{shards.resolve().name}.json")  # a read-only shard folder: here instead
            atomic_write(path, json.dumps(res, indent=1))
        click.echo(f"report: {path}")
    if checkpoint is not None:
        res = verify_checkpoint(checkpoint)
        if res["problems"]:
            bad = True
            click.echo(f"checkpoint {checkpoint}: {len(res['problems'])} problem(s)")
            for p in res["problems"][:20]:
                click.echo(f"  {p}")
        else:
            click.echo(f"checkpoint {checkpoint}: loads safely, {res['parameters']:,} parameters "
                       f"(preset {res['preset']}; step {res['step']}, epoch {res['epoch']}), every tensor matches "
                       f"its config, 1 s of silence -> logits {res['output_shape_for_1s']}")
            click.echo("  " + ", ".join(f"{k} {v:,}" for k, v in res["modules"].items()))
    if bad:
        sys.exit(1)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Any checkpoint transcribe accepts (averaged ones too).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Export folder.")
@click.option("--chunk-frames", default=32, show_default=True, type=POS,
              help="Frames per chunk of streaming.onnx (10 ms each; a multiple of the downsampling).")
@user_errors
def export(checkpoint: Path, out: Path, chunk_frames: int) -> None:
    """ONNX models (offline; streaming with explicit state for causal models) + tokens, features, normalisation."""
    from lmu_asr.export import export as run_export
    from lmu_asr.train.checkpoint import model_from_checkpoint

    model, cfg = model_from_checkpoint(checkpoint, "cpu")
    report = run_export(model, cfg, out, chunk_frames)
    click.echo(f"wrote {', '.join(report['files'])} to {out}")
    click.echo(f"onnxruntime vs PyTorch: offline within {report['offline_max_diff']:.1e}"
               + (f", streaming within {report['streaming_max_diff']:.1e}" if "streaming_max_diff" in report
                  else f"; {report.get('streaming', '')}"))


@main.command()
@click.option("--run", type=click.Path(path_type=Path), help="A run folder: average its last epoch checkpoints.")
@click.option("--last", default=5, show_default=True, type=click.IntRange(min=2), help="How many (with --run).")
@click.option("--checkpoints", multiple=True, type=click.Path(path_type=Path), help="Or name them (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), help="Default: RUN/checkpoints/averaged_last{N}.pt.")
@user_errors
def average(run: Path | None, last: int, checkpoints: tuple[Path, ...], out: Path | None) -> None:
    """Average the weights of several checkpoints into one that eval, transcribe and export accept."""
    from lmu_asr.train import checkpoint as ckpt

    if bool(run) == bool(checkpoints):
        raise UserError("give --run RUN (with --last N) or --checkpoints A --checkpoints B ...")
    if run is not None:
        found = ckpt.epoch_checkpoints(run)
        if len(found) < last:
            raise UserError(f"{run} has {len(found)} epoch checkpoint(s), --last {last} needs {last}")
        paths = found[-last:]
        out = out or run / "checkpoints" / f"averaged_last{last}.pt"
    else:
        paths = list(checkpoints)
        out = out or paths[-1].with_name(f"averaged_{len(paths)}.pt")
    ckpt.atomic_save(ckpt.average(paths), out)
    click.echo(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) into {out}")


@main.command()
@click.option("--path", "paths", multiple=True, type=click.Path(path_type=Path),
              help="Where shards and checkpoints go: free disk is checked there (repeatable; default: .).")
@click.option("--min-free-gb", default=20.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--quick", is_flag=True, help="Skip the torch.compile and DDP smoke tests (seconds each).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(paths: tuple[Path, ...], min_free_gb: float, quick: bool, as_json: bool) -> None:
    """Check the environment before a long job: one line per check, the fix when it fails; exit 1 on failures."""
    import json

    from lmu_asr import doctor as doc

    checks = doc.run_checks(list(paths) or [Path(".")], min_free_gb, quick)
    if as_json:
        click.echo(json.dumps(doc.as_json(checks), indent=1))
    else:
        for line in doc.format_checks(checks):
            click.echo(line)
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        if not as_json:
            click.echo(f"{len(failed)} required check(s) failed: {', '.join(failed)}", err=True)
        sys.exit(1)


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="PNG path (default RUN/curves.png).")
@user_errors
def plot(run: Path, out: Path | None) -> None:
    """Draw the loss / dev WER curves of a run as a PNG."""
    from lmu_asr.train.metrics import plot_run

    click.echo(str(plot_run(run, out)))


@main.command()
@click.option("--out", default="demo_run", show_default=True, type=click.Path(path_type=Path),
              help="Run directory (corpus, shards, run/, report.md).")
@click.option("--speech-dir", type=click.Path(path_type=Path),
              help="Use a transcripts.tsv folder (utt_id path speaker text) instead of the built-in corpus.")
@click.option("--test-speakers", default="", help="Comma-separated speakers held out for testing.")
@click.option("--test-pattern", help="Regex on utt_id selecting test utterances (FSDD's own split: '_0[0-4]$').")
@click.option("--mix-synthetic", default=0, show_default=True, type=NONNEG,
              help="Add N training utterances: the training transcripts spoken by eSpeak voices.")
@click.option("--speed-perturb", default="", metavar="F1,F2",
              help="Add a copy of every training utterance at each speed factor (e.g. 0.9,1.1).")
@click.option("--preset", default="cpu-small", show_default=True)
@click.option("--epochs", type=POS, help="Training epochs (default: the preset's).")
@click.option("--set", "sets", multiple=True, help="Config overrides for training (--set model.dropout=0.2).")
@click.option("--utterances", default=1500, show_default=True, type=click.IntRange(min=10), help="Built-in corpus: training utterances.")
@click.option("--quick", is_flag=True, help="A small, fast version (about 40 s on 2 CPU cores).")
@click.option("--jobs", default=2, show_default=True, type=POS)
@click.option("--beam", default=8, show_default=True, type=NONNEG)
@click.option("--seed", default=0, show_default=True, type=NONNEG)
@click.option("--progress/--no-progress", default=True)
@user_errors
def demo(out: Path, speech_dir: Path | None, test_speakers: str, test_pattern: str | None, mix_synthetic: int,
         speed_perturb: str, preset: str, epochs: int | None, sets: tuple[str, ...], utterances: int, quick: bool, jobs: int,
         beam: int, seed: int, progress: bool) -> None:
    """Build a corpus, prep, train, evaluate on held-out speakers, transcribe, bench, and write a report."""
    from lmu_asr.demo import DemoOptions, run_demo, summary_screen

    if test_speakers and test_pattern:
        raise UserError("give --test-speakers or --test-pattern, not both")
    if (test_speakers or test_pattern or mix_synthetic) and speech_dir is None:
        raise UserError("--test-speakers, --test-pattern and --mix-synthetic need --speech-dir")
    try:
        speeds = [float(f) for f in speed_perturb.split(",") if f.strip()]
    except ValueError:
        raise UserError(f"--speed-perturb: expected factors like 0.9,1.1, got {speed_perturb!r}") from None
    if any(not 0.5 <= f <= 2.0 or f == 1.0 for f in speeds):
        raise UserError("--speed-perturb factors must lie in [0.5, 2] and differ from 1")
    opts = DemoOptions(out=out, speech_dir=speech_dir, test_speakers=[s for s in test_speakers.split(",") if s],
                       test_pattern=test_pattern, mix_synthetic=mix_synthetic, speed_perturb=speeds, preset=preset, epochs=epochs,
                       overrides=_overrides(sets), utterances=utterances, quick=quick, jobs=jobs, beam=beam,
                       seed=seed, progress=progress)
    click.echo(summary_screen(run_demo(opts)))


@main.group()
def bench() -> None:
    """Throughput, memory and MFU benchmarks (JSON + markdown + PNG reports)."""


def _bench_device(device: str):  # noqa: ANN202
    import torch

    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


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

    data = bench_model(out, int_list(lengths, "--lengths"), batch, _bench_device(device), memory_dim=memory_dim)
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
    dev = _bench_device(device)
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
    data = bench_scale(cfg, out, _bench_device(device), frames, int_list(batches, "--batches"),
                       peak_tflops=peak_tflops)
    click.echo(f"knee at batch {data['knee_batch']}; out of memory at {data['out_of_memory_at'] or 'none'}")
    click.echo("reports: " + ", ".join(data["files"]))


@bench.command("gpu")
@click.option("--out", default="bench/results/gpu", show_default=True, type=click.Path(path_type=Path))
@click.option("--smoke", is_flag=True, help="The same stages at CPU size (CI): checks the kit, measures nothing.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@user_errors
def bench_gpu_cmd(out: Path, smoke: bool, device: str) -> None:
    """Every GPU measurement in one call of <= 8 minutes (bench/gpu.sh): train, syncs, memory, loader, compile."""
    from lmu_asr.bench.gpu import run_kit

    dev = _bench_device(device)
    if dev.type != "cuda" and not smoke:
        raise UserError("bench gpu needs a CUDA device (use --smoke to check the kit on a CPU)")
    summary = run_kit(out, dev, smoke)
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
    data = bench_compile(cfg, out, _bench_device(device), int_list(frames, "--frames", 2), rows, strategies)
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


if __name__ == "__main__":  # pragma: no cover
    main()
