"""The ``lmuasr`` tools around training: download, verify, export, average, adapt, doctor, lm build, tune-lm.

Registered on the ``lmuasr`` group by importing this module (``lmu_asr.cli`` does); heavy imports stay inside the
commands so ``lmuasr --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lmu_asr import UserError
from lmu_asr.cli_common import NONNEG, POS, lm_options, resolve_device, user_errors, word_decoder


@click.command()
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


@click.command()
@click.argument("shards", required=False)
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Verify a checkpoint instead (or as well).")
@click.option("--report", type=click.Path(path_type=Path),
              help="JSON report (default: SHARDS/verify.json; for URLs, verify_<their folder>.json here).")
@click.option("--progress/--no-progress", default=True)
@user_errors
def verify(shards: str | None, checkpoint: Path | None, report: Path | None, progress: bool) -> None:
    """Read every member of every shard once and check it against the index; or check a checkpoint. Exit 1 if
    anything is damaged. SHARDS: a folder, or webdataset URLs as for train --shards."""
    import json

    from lmu_asr.data.stream import is_url
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
        here = Path(f"verify_{res['label']}.json")  # a read-only folder or URLs: written here
        path = report or (here if is_url(shards) else Path(shards) / "verify.json")
        try:
            atomic_write(path, json.dumps(res, indent=1))
        except OSError:
            if report is not None:
                raise
            path = here
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


@click.command()
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


@click.command()
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


@click.command()
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



@click.group()
def lm() -> None:
    """Word n-gram language models for decoding (build one from transcripts)."""


@lm.command("build")
@click.option("--shards", "shard_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Prep outputs whose transcripts train the LM (repeatable).")
@click.option("--text", "text_files", multiple=True, type=click.Path(path_type=Path),
              help="Text files, one sentence per line, in the model's alphabet (repeatable).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="LM folder (lm.arpa, lexicon.txt).")
@click.option("--order", default=3, show_default=True, type=click.IntRange(min=2, max=6))
@user_errors
def lm_build(shard_dirs: tuple[Path, ...], text_files: tuple[Path, ...], out: Path, order: int) -> None:
    """Kneser-Ney word n-gram LM (KenLM-compatible ARPA) and lexicon from shard transcripts or text files."""
    from lmu_asr.lm.build import build_lm, shard_texts
    from lmu_asr.text import normalize_transcript

    if not shard_dirs and not text_files:
        raise UserError("give --shards DIR or --text FILE (repeatable) to build the LM from")
    texts: list[str] = []
    for d in shard_dirs:
        texts += shard_texts(d)
    for f in text_files:
        if not f.is_file():
            raise UserError(f"text file not found: {f}")
        texts += [normalize_transcript(line) for line in f.read_text(errors="replace").splitlines()]
    info = build_lm(texts, out, order, [str(p) for p in (*shard_dirs, *text_files)])
    click.echo(f"{order}-gram LM of {info['sentences']:,} sentences ({info['words']:,} words, vocabulary "
               f"{info['vocabulary']:,}; n-grams {', '.join(f'{n:,}' for n in info['ngrams'])}) in {out} "
               f"in {info['seconds']:.1f} s")


@click.command("tune-lm")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--shards", required=True, help="A DEV set (never the test set): a folder or URLs, as train --shards.")
@click.option("--lm", "lm_dir", required=True, type=click.Path(path_type=Path))
@click.option("--beam", type=POS, help="Beam width (default: 512 with the lexicon, 32 without).")
@click.option("--lexicon/--no-lexicon", default=True, show_default=True)
@click.option("--weights", default="0.5,1,1.5,2,2.5,3,3.5,4", show_default=True)
@click.option("--word-scores", default="-2,-1,0,1", show_default=True)
@click.option("--jobs", type=POS, help="Processes for the grid (default: one per available core).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@user_errors
def tune_lm(checkpoint: Path, shards: str, lm_dir: Path, beam: int | None, lexicon: bool, weights: str,
            word_scores: str, jobs: int | None, device: str) -> None:
    """Pick the LM weight and word score on DEV; writes LM/tuned.json, which eval/transcribe then use."""
    from lmu_asr.data.stream import open_shards
    from lmu_asr.lm.tune import tune
    from lmu_asr.train.checkpoint import model_from_checkpoint
    from lmu_asr.train.evaluate import evaluate

    def floats(text: str, flag: str) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}") from None

    dev = resolve_device(device)
    model, cfg = model_from_checkpoint(checkpoint, dev)
    utterances: list = []
    shard_set, remote = open_shards(shards)
    base = evaluate(model, shard_set, cfg, dev, collect=utterances, remote=remote)
    res = tune(lm_dir, utterances, beam, lexicon, floats(weights, "--weights"), floats(word_scores, "--word-scores"),
               str(checkpoint), jobs)
    o = res["options"]
    click.echo(f"DEV ({res['dev_utterances']} utterances): greedy WER {100 * base['wer']:.2f} %; with the LM "
               f"{100 * res['dev_wer']:.2f} % at LM weight {o['lm_weight']:g}, word score {o['word_score']:g} "
               f"({len(res['grid'])} points in {res['seconds']:.1f} s); saved to {lm_dir / 'tuned.json'}")


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--shards", required=True, type=click.Path(path_type=Path),
              help="A shard folder of the voices to adapt to; its transcripts are never read.")
@click.option("--train-shards", type=click.Path(path_type=Path),
              help="Labelled shards (the training set), drawn afresh into every epoch so the model keeps what it knew "
                   "(recommended: without them it learns its own hypotheses alone).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The adapted checkpoint (.pt).")
@click.option("--beam", default=0, show_default=True, type=NONNEG, help="Without --lm: prefix beam width (0: greedy).")
@click.option("--rounds", default=3, show_default=True, type=POS, help="Decode, keep, fine-tune: how many times.")
@click.option("--epochs", default=5, show_default=True, type=POS, help="Fine-tuning passes per round.")
@click.option("--keep", default=0.6, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Share of hypotheses kept each round, most confident first.")
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--labelled-ratio", default=3.0, show_default=True, type=click.FloatRange(min=0),
              help="Labelled utterances drawn per kept hypothesis (with --train-shards).")
@click.option("--seed", default=0, show_default=True, type=NONNEG)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@lm_options
@user_errors
def adapt(checkpoint: Path, shards: Path, train_shards: Path | None, out: Path, beam: int, rounds: int, epochs: int,
          keep: float, lr: float, labelled_ratio: float, seed: int, device: str, lm_dir: Path | None,
          lm_weight: float | None, word_score: float | None, lexicon: bool | None) -> None:
    """Adapt a checkpoint to new voices from their audio alone (iterative pseudo-labelling); writes a checkpoint
    that eval, transcribe and export accept, and OUT's .json report."""
    import json

    from lmu_asr.data.shards import ShardSet
    from lmu_asr.fileio import atomic_write
    from lmu_asr.train.adapt import AdaptOptions, adapted_payload
    from lmu_asr.train.adapt import adapt as run_adapt
    from lmu_asr.train.checkpoint import atomic_save, model_from_checkpoint

    if out.suffix != ".pt":
        raise UserError(f"--out names the adapted checkpoint, a .pt file, got {out}")
    words = word_decoder(lm_dir, beam, lm_weight, word_score, lexicon)
    opts = AdaptOptions(rounds=rounds, epochs=epochs, keep=keep, lr=lr, labelled_ratio=labelled_ratio, seed=seed)
    opts.check()
    for flag, path in (("--shards", shards), ("--train-shards", train_shards)):
        if path is not None and not path.is_dir():
            raise UserError(f"{flag}: shard folder not found: {path}")
    dev = resolve_device(device)
    model, cfg = model_from_checkpoint(checkpoint, dev)
    labelled = ShardSet.open(train_shards) if train_shards is not None else None
    report = run_adapt(model, cfg, ShardSet.open(shards), dev, opts, words, beam, labelled)
    report = {"checkpoint": str(checkpoint), "shards": str(shards), "train_shards": str(train_shards or ""), **report}
    atomic_save(adapted_payload(model, cfg, checkpoint, report), out)
    atomic_write(out.with_suffix(".json"), json.dumps(report, indent=1))
    click.echo(f"adapted {checkpoint} to {report['utterances']} utterances of {shards} in {report['seconds']:.0f} s "
               f"({rounds} rounds, {report['rounds'][-1]['kept']} hypotheses kept in the last); wrote {out}")


COMMANDS = (download, verify, export, average, adapt, doctor, lm, tune_lm)
