"""The ``lmuasr`` command: prep, train, eval, transcribe, bench, demo, plot.

Every subcommand turns user errors (:class:`lmu_asr.UserError`, bad config values, missing files) into one line on
stderr and exit status 2; ``--debug`` on the group shows the traceback instead. Heavy imports happen inside the
subcommands so ``lmuasr --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from lmu_asr import UserError, __version__
from lmu_asr.cli_common import (  # noqa: F401
    EXIT_USER_ERROR,
    NONNEG,
    POS,
    _overrides,
    eval_vtln,
    int_list,
    lm_options,
    resolve_device,
    user_errors,
    word_decoder,
)

MAX_SPEAKERS_SHOWN = 8  # eval's screen line: a corpus of thousands of speakers shows its worst, the report all


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


@main.command()
@click.option("--shards", required=True,
              help="Training shards: a prep folder, or webdataset URLs (https://host/shard-{000000..000099}.tar, "
                   "pipe:CMD, file:PATH) with index.parquet and meta.json beside them.")
@click.option("--dev-shards", help="Validation shards (loss, WER each epoch): a folder or URLs, as --shards.")
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
def train(shards: str, dev_shards: str | None, out: Path, preset: str | None, config_file: Path | None,
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
    if result["step"]:
        click.echo(f"throughput: {result['utt_per_s']:.0f} utt/s, {result['audio_s_per_s']:.0f} audio-s/s, "
                   f"data wait {100 * result['data_wait']:.1f} % (this process, from its first step on)")
    click.echo(f"checkpoints: {out / 'checkpoints'}")


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--shards", required=True, help="A shard folder, or webdataset URLs with index.parquet and meta.json "
              "beside them (as train --shards).")
@click.option("--beam", default=0, show_default=True, type=NONNEG, help="Prefix beam width (0: greedy).")
@click.option("--report", type=click.Path(path_type=Path), help="JSON report path (default: beside the checkpoint).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--vtln", is_flag=True, help="One frequency warp per speaker of the index, chosen from the posteriors "
              "(test-time VTLN; needs a shard folder whose index names speakers).")
@click.option("--warps", help="--vtln: the warps tried, comma-separated (default: 0.92 to 1.08 by 0.04).")
@click.option("--band-edge-hz", type=click.FloatRange(min=1000), help="--vtln: the recordings' upper band edge "
              "(half their sample rate), which the warp keeps in place (default: the whole fbank axis).")
@lm_options
@user_errors
def eval_cmd(checkpoint: Path, shards: str, beam: int, report: Path | None, device: str, vtln: bool, warps: str | None,
             band_edge_hz: float | None, lm_dir: Path | None, lm_weight: float | None, word_score: float | None,
             lexicon: bool | None) -> None:
    """WER/CER (GigaSpeech scoring) of a checkpoint on a shard set; writes a JSON report."""
    import json

    import torch

    from lmu_asr.data.stream import open_shards, set_label
    from lmu_asr.fileio import atomic_write as atomic_write_text
    from lmu_asr.text import TOP_CONFUSIONS, confusion_line, rates_by_group, word_confusions
    from lmu_asr.train.checkpoint import model_from_checkpoint
    from lmu_asr.train.evaluate import evaluate

    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    words = word_decoder(lm_dir, beam, lm_weight, word_score, lexicon)  # flag errors before the model loads
    if not vtln and (band_edge_hz is not None or warps is not None):
        raise UserError("--warps and --band-edge-hz go with --vtln")
    model, cfg = model_from_checkpoint(checkpoint, dev)
    shard_set, remote = open_shards(shards)
    label = words.opts.label() if words else ("beam" + str(beam) if beam > 1 else "greedy")
    if vtln:
        res = eval_vtln(model, cfg, dev, shard_set, remote, warps, band_edge_hz, words, beam, label)
        label += "+vtln"
    else:
        res = evaluate(model, shard_set, cfg, dev, beam=beam, keep_hyps=True,
                       decoder=words.decode if words else None, remote=remote)
    if words:
        from lmu_asr.lm.decode import describe

        res["lm"] = {"dir": str(lm_dir), **describe(words.opts)}
    confusions = word_confusions((ref, hyp) for _, ref, hyp in res["hypotheses"])
    res["confusions"] = confusions[:TOP_CONFUSIONS]
    speakers = shard_set.speakers()
    if len(set(speakers.values())) > 1:  # the index names the speakers: which voices fail
        res["per_speaker"] = rates_by_group(res["hypotheses"], speakers)
    report = report or checkpoint.parent / f"eval_{set_label(shards, remote)}_{label.replace('+', '_')}.json"
    atomic_write_text(report, json.dumps({"checkpoint": str(checkpoint), "shards": str(shards), **res}, indent=1))
    detail = (f"{label}, LM weight {words.opts.lm_weight:g}, word score {words.opts.word_score:g}" if words
              else label.replace("beam", "beam "))
    click.echo(f"WER {100 * res['wer']:.2f} %  CER {100 * res['cer']:.2f} %  ({res['utterances']} utterances, "
               f"{res['ref_words']} words, {detail})")
    if confusions:
        click.echo(f"most frequent word errors: {confusion_line(confusions)}")
    if "per_speaker" in res:
        by = sorted(res["per_speaker"].items(), key=lambda kv: -kv[1]["wer"])
        shown = ", ".join(f"{spk} {100 * v['wer']:.2f} %" for spk, v in by[:MAX_SPEAKERS_SHOWN])
        more = ", worst first, all in the report" if len(by) > MAX_SPEAKERS_SHOWN else ""
        click.echo(f"WER by speaker ({len(by)}{more}): {shown}")
    if vtln:
        from lmu_asr.model.vtln import warp_summary

        click.echo(f"warps: {warp_summary(res['warps'])}")
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
@lm_options
@user_errors
def transcribe(checkpoint: Path, files: tuple[Path, ...], beam: int, streaming: bool, chunk_frames: int,
               device: str, lm_dir: Path | None, lm_weight: float | None, word_score: float | None,
               lexicon: bool | None) -> None:
    """Print PATH<TAB>TEXT per audio file (wav/flac/opus..., any sample rate). Exit 1 if a file failed."""
    import torch

    from lmu_asr.infer import transcribe_files
    from lmu_asr.train.checkpoint import model_from_checkpoint

    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    words = word_decoder(lm_dir, beam, lm_weight, word_score, lexicon)
    model, _ = model_from_checkpoint(checkpoint, dev)
    if streaming:
        model.encoder.stream_init()  # raises a clear error for full-attention models
    failed = 0
    for path, text, error in transcribe_files(model, list(files), beam, streaming, chunk_frames, words):
        if error is not None:
            failed += 1
            click.echo(f"error: {error}", err=True)
        else:
            click.echo(f"{path}\t{text}")
    if failed:
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
@click.option("--epochs", type=POS, help="Training epochs (default: 25 on the built-in corpus, 80 on "
              "--speech-dir, 8 with --quick).")
@click.option("--set", "sets", multiple=True, help="Config overrides for training (--set model.dropout=0.2).")
@click.option("--utterances", default=1500, show_default=True, type=click.IntRange(min=10), help="Built-in corpus: training utterances.")
@click.option("--quick", is_flag=True, help="A small, fast version (about 45 s on 2 CPU cores).")
@click.option("--jobs", default=2, show_default=True, type=POS)
@click.option("--beam", default=8, show_default=True, type=NONNEG)
@click.option("--seed", default=0, show_default=True, type=NONNEG,
              help="Seeds the corpus (voices, grouping into recordings) and training (train.seed = 1234 + N).")
@click.option("--lm/--no-lm", "use_lm", default=True, show_default=True,
              help="Build a word LM from the training transcripts, tune it on DEV, report TEST with and without it.")
@click.option("--vtln", is_flag=True, help="Also score TEST with one frequency warp per test speaker, chosen from "
              "the model's posteriors (rows greedy+vtln and, with the LM, beam512+lm+vtln).")
@click.option("--adapt/--no-adapt", default=None, help="Also score TEST after `lmuasr adapt` to its voices: their "
              "audio pseudo-labelled, never their transcripts (rows greedy+adapt and, with the LM, beam512+lm+adapt). "
              "Default: on with --speech-dir.")
@click.option("--progress/--no-progress", default=True)
@user_errors
def demo(out: Path, speech_dir: Path | None, test_speakers: str, test_pattern: str | None, mix_synthetic: int,
         speed_perturb: str, preset: str, epochs: int | None, sets: tuple[str, ...], utterances: int, quick: bool, jobs: int,
         beam: int, seed: int, use_lm: bool, vtln: bool, adapt: bool | None, progress: bool) -> None:
    """Build a corpus, prep, train, evaluate on held-out speakers, transcribe, bench, and write a report."""
    from lmu_asr.demo import DemoOptions, run_demo
    from lmu_asr.demo_report import summary_screen

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
                       seed=seed, progress=progress, lm=use_lm, vtln=vtln, adapt=adapt)
    click.echo(summary_screen(run_demo(opts)))


# the tools (download, verify, export, average, doctor, lm, tune-lm) and the benches live in modules of their own
from lmu_asr.bench.cli import bench  # noqa: E402
from lmu_asr.cli_tools import COMMANDS  # noqa: E402

for command in (*COMMANDS, bench):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    main()
