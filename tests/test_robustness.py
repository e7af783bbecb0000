"""What a hostile new user meets: one row per bad-input or fault scenario, and what must happen.

Each row builds its scenario in a fresh folder (damaged copies of inputs under ``inputs/``, everything the command
writes under ``out/``), runs the real command line, and checks the exit status (0 only when the asked work was
done; 1 when part of it failed, said per item; 2 for a user or OS error), a fragment of the one-line message, no
Python traceback, and that nothing half-written was left under a final name in ``out/``. Rows with a ``check``
also verify what was done (the damaged key was skipped and counted, the rest was trained, the old checkpoint is
intact...). README section "What happens with bad input" summarises this table.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from lmu_asr.prep.shards import iter_shard, npy_bytes
from tests.helpers import ROOT, run_cli


@dataclass
class Ctx:
    """Paths of one scenario; the session's clean synthetic corpus, shards and run are copied before damage."""

    tmp: Path
    corpus: Path
    shards: Path
    dev: Path
    run: Path
    notes: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / "inputs" / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".index-cache-*"))
        return dst

    def first_key(self, shards: Path, shard: str = "shard-000000.tar") -> str:
        rows = pq.read_table(shards / "index.parquet", columns=["key", "shard", "position"]).to_pylist()
        return min((r["position"], r["key"]) for r in rows if r["shard"] == shard)[1]


def rewrite_tar(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a shard member by member (``edit`` returns new bytes, or None to drop the member), like tar does."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            new = edit(m.name, data)
            if new is not None:
                m.size = len(new)
                out.addfile(m, io.BytesIO(new))
    path.write_bytes(buf.getvalue())


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def half(path: Path) -> None:
    truncate(path, path.stat().st_size // 2)


def n_utts(shards: Path) -> int:
    return pq.read_metadata(shards / "index.parquet").num_rows


def logged_utterances(run: Path) -> int:
    return sum(json.loads(line)["utterances"] for line in (run / "log.jsonl").read_text().splitlines())


def damaged_records(run: Path) -> list[dict]:
    path = run / "damaged.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--shards", str(shards), "--out", str(out), "--preset", "cpu-tiny", "--epochs", "1",
            "--workers", "0", "--no-progress", *extra]


def assert_complete(root: Path, planted: list[Path] = ()) -> None:
    """Nothing half-written under a final name: every file we write is whole (or a temp name is left nowhere)."""
    from lmu_asr.train.checkpoint import load

    if not root.exists():
        return
    for path in root.rglob("*"):
        if not path.is_file() or path.name.endswith(".lock") or "manifests" in path.parts or path in planted:
            continue
        assert not path.name.endswith(".tmp"), f"temporary file left behind: {path}"
        if path.suffix == ".pt":
            load(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".tar":
            for _ in iter_shard(path):
                pass
        elif path.suffix == ".parquet":
            pq.read_table(path)


# ------------------------------------------------------------------------------------------ scenario setups
def damaged_member(member: str, edit: Callable[[bytes], bytes | None]) -> Callable[[Ctx], list[str]]:
    """Rewrite the first utterance's ``member`` (fbank.npy or json) of shard 0 with ``edit`` (None: remove it)."""
    def setup(c: Ctx) -> list[str]:
        s = c.copy(c.shards, "shards")
        c.notes["key"] = key = c.first_key(s)
        rewrite_tar(s / "shard-000000.tar", lambda name, data: edit(data) if name == f"{key}.{member}" else data)
        c.notes["total"] = n_utts(s)
        return train_args(s, c.out)
    return setup


member_removed = damaged_member("fbank.npy", lambda data: None)
member_40_bins = damaged_member("fbank.npy", lambda data: npy_bytes(np.zeros((50, 40), np.float16)))
member_nan = damaged_member("fbank.npy", lambda data: data[:128] + b"\x00\x7e" * ((len(data) - 128) // 2))
member_bad_json = damaged_member("json", lambda data: b"{" * len(data))


def skipped_one(reason: str) -> Callable[[Ctx, str], None]:
    def check(c: Ctx, output: str) -> None:
        records = damaged_records(c.out)
        assert [(r["key"], r["reason"]) for r in records] == [(c.notes["key"], reason)], records
        assert logged_utterances(c.out) == c.notes["total"] - 1  # the rest of that shard was trained
        assert "1 damaged sample(s) skipped" in output
    return check


def all_halved(c: Ctx) -> list[str]:
    s = c.copy(c.shards, "shards")
    for tar in s.glob("shard-*.tar"):
        half(tar)
    return train_args(s, c.out, "--dry-run")


def check_halved(c: Ctx, output: str) -> None:
    line = next(x for x in output.splitlines() if x.startswith("epoch 0 on this rank"))
    used = int(line.split(":")[1].split()[0])
    assert 0 < used < n_utts(c.tmp / "inputs" / "shards") and "past_end_of_truncated_shard" in line


def all_truncated(c: Ctx) -> list[str]:
    s = c.copy(c.shards, "shards")
    for tar in s.glob("shard-*.tar"):
        truncate(tar, 700)
    return train_args(s, c.out, "--max-steps", "3")


def all_garbage(c: Ctx) -> list[str]:
    s = c.copy(c.shards, "shards")
    rng = np.random.default_rng(0)
    for tar in s.glob("shard-*.tar"):
        tar.write_bytes(rng.integers(0, 256, tar.stat().st_size, dtype=np.uint8).tobytes())
    return train_args(s, c.out, "--max-steps", "2")


def shard_deleted(c: Ctx) -> list[str]:
    s = c.copy(c.shards, "shards")
    (s / "shard-000001.tar").unlink()
    return train_args(s, c.out, "--dry-run")


def eval_args(c: Ctx, shards: Path) -> list[str]:
    return ["eval", "--checkpoint", str(c.run / "checkpoints" / "last.pt"), "--shards", str(shards), "--report",
            str(c.out / "eval.json")]


def eval_truncated(c: Ctx) -> list[str]:
    s = c.copy(c.dev, "dev")
    truncate(s / "shard-000000.tar", 100)
    return eval_args(c, s)


def eval_one_missing(c: Ctx) -> list[str]:
    s = c.copy(c.dev, "dev")
    c.notes["key"] = key = c.first_key(s)
    rewrite_tar(s / "shard-000000.tar", lambda name, data: None if name == f"{key}.fbank.npy" else data)
    c.notes["total"] = n_utts(s)
    c.out.mkdir(parents=True)
    return eval_args(c, s)


def check_eval_partial(c: Ctx, output: str) -> None:
    report = json.loads((c.out / "eval.json").read_text())
    assert report["utterances"] == c.notes["total"] - 1 and report["damaged"]["count"] == 1
    assert report["damaged"]["examples"][0]["key"] == c.notes["key"]


def dev_unreadable(c: Ctx) -> list[str]:
    d = c.copy(c.dev, "dev")
    truncate(d / "shard-000000.tar", 100)
    return train_args(c.shards, c.out, "--dev-shards", str(d))


def dev_one_missing(c: Ctx) -> list[str]:
    d = c.copy(c.dev, "dev")
    key = c.first_key(d)
    rewrite_tar(d / "shard-000000.tar", lambda name, data: None if name == f"{key}.json" else data)
    return train_args(c.shards, c.out, "--dev-shards", str(d))


def check_dev_partial(c: Ctx, output: str) -> None:
    (record,) = [json.loads(x) for x in (c.out / "eval.jsonl").read_text().splitlines()]
    assert record["unreadable"] == 1 and record["utterances"] == n_utts(c.dev) - 1


def garbage_file(name: str) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        s = c.copy(c.shards, "shards")
        (s / name).write_bytes(b"not what you think" * 10)
        return train_args(s, c.out)
    return setup


def corpus_with(edit: Callable[[bytes], bytes]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        corpus = c.tmp / "inputs" / "corpus"
        corpus.mkdir(parents=True)
        (corpus / "audio").symlink_to(c.corpus / "audio")
        (corpus / "GigaSpeech.json").write_bytes(edit((c.corpus / "GigaSpeech.json").read_bytes()))
        return ["prep", "--corpus-dir", str(corpus), "--subset", "xs", "--out", str(c.out), "--no-progress"]
    return setup


def prep_args(c: Ctx, corpus: Path | None = None, out: Path | None = None) -> list[str]:
    return ["prep", "--corpus-dir", str(corpus or c.corpus), "--subset", "xs", "--out", str(out or c.out),
            "--shard-frames", "3000", "--shuffle-group", "2", "--no-progress"]


def corpus_changed(c: Ctx) -> list[str]:
    corpus = c.tmp / "inputs" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "audio").symlink_to(c.corpus / "audio")
    shutil.copy(c.corpus / "GigaSpeech.json", corpus / "GigaSpeech.json")
    assert run_cli(*prep_args(c, corpus))[0] == 0
    meta = json.loads((corpus / "GigaSpeech.json").read_text())
    seg = next(s for a in meta["audios"] for s in a["segments"] if not s["text_tn"].startswith("<"))
    seg["text_tn"] = "SOMETHING ELSE ENTIRELY"
    (corpus / "GigaSpeech.json").write_text(json.dumps(meta))
    return prep_args(c, corpus)


def manifests_interrupted(c: Ctx) -> list[str]:
    """What kill -9 inside lhotse's manifest writers leaves: 0-byte and cut jsonl.gz files, no marker."""
    assert run_cli(*prep_args(c))[0] == 0
    state = c.out / ".prep"
    for name in ("index.parquet", "meta.json"):
        (c.out / name).unlink()
    partial = state / "manifests.partial"
    (state / "manifests").rename(partial)
    for i, f in enumerate(sorted(partial.glob("*.jsonl.gz"))):
        truncate(f, 0 if i == 0 else f.stat().st_size // 3)
    return prep_args(c)


def check_same_shards(c: Ctx, output: str) -> None:
    names = sorted(p.name for p in c.shards.glob("shard-*"))
    assert names == sorted(p.name for p in c.out.glob("shard-*"))
    for name in names:
        assert (c.shards / name).read_bytes() == (c.out / name).read_bytes()


def unwritable_dir(c: Ctx) -> Path:
    """A directory we cannot create files in, as root too (/sys refuses mkdir with EPERM)."""
    if os.geteuid() != 0:
        locked = c.tmp / "inputs" / "locked"
        locked.mkdir(parents=True)
        locked.chmod(0o500)
        return locked / "out"
    return Path("/sys/lmu-asr-robustness-test")


def crafted_checkpoint(c: Ctx) -> Path:
    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {c.tmp / 'executed'}",))

    path = c.tmp / "inputs" / "evil.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(), "config": {}}, path)
    return path


def check_not_executed(c: Ctx, output: str) -> None:
    assert not (c.tmp / "executed").exists()


def crafted_resume(c: Ctx) -> list[str]:
    run = c.out
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(crafted_checkpoint(c), run / "checkpoints" / "last.pt")
    c.notes["planted"] = [run / "checkpoints" / "last.pt"]
    return train_args(c.shards, run, "--resume")


def old_format_checkpoint(c: Ctx) -> list[str]:
    """A checkpoint as this project wrote it before weights_only loading (numpy RNG state inside)."""
    from lmu_asr.train.checkpoint import load

    state = load(c.run / "checkpoints" / "last.pt")
    state["rng"]["numpy"] = np.random.get_state()
    path = c.tmp / "inputs" / "old.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    wav = c.tmp / "inputs" / "a.wav"
    sf.write(wav, np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1, 16000)
    return ["transcribe", "--checkpoint", str(path), str(wav)]


def transcribe_mixed(c: Ctx) -> list[str]:
    d = c.tmp / "inputs"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(d / "short.wav", rng.standard_normal(100).astype(np.float32) * 0.1, 16000)
    sf.write(d / "good.wav", rng.standard_normal(16000).astype(np.float32) * 0.1, 16000)
    sf.write(d / "stereo44k.flac", rng.standard_normal((44100, 2)).astype(np.float32) * 0.1, 44100)
    (d / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnothing")
    return ["transcribe", "--checkpoint", str(c.run / "checkpoints" / "last.pt"), str(d / "short.wav"),
            str(d / "good.wav"), str(d / "missing.wav"), str(d / "garbage.wav"), str(d / "stereo44k.flac")]


def check_mixed(c: Ctx, output: str) -> None:
    lines = output.splitlines()
    assert any(x.startswith(f"{c.tmp / 'inputs' / 'good.wav'}\t") for x in lines)
    assert any(x.startswith(f"{c.tmp / 'inputs' / 'stereo44k.flac'}\t") for x in lines)
    assert sum(x.startswith("error:") for x in lines) == 3


def ckpt_dir_is_file(c: Ctx) -> list[str]:
    c.out.mkdir(parents=True)
    (c.out / "checkpoints").write_text("in the way")
    return train_args(c.shards, c.out)


def cuts_truncated(c: Ctx) -> list[str]:
    manifest = c.shards / ".prep" / "manifests" / "gigaspeech_cuts_XS.jsonl.gz"
    cut = c.tmp / "inputs" / "cuts.jsonl.gz"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    return ["prep", "--cuts", str(cut), "--out", str(c.out), "--no-progress"]


def flag(*args: str) -> Callable[[Ctx], list[str]]:
    return lambda c: [a.format(shards=c.shards, out=c.out, ckpt=c.run / "checkpoints" / "last.pt") for a in args]


@dataclass
class Row:
    id: str
    setup: Callable[[Ctx], list[str]]
    code: int
    fragment: str
    check: Callable[[Ctx, str], None] | None = None


ROWS = [
    # damaged shards: contained to the sample, counted with key and reason; never a fake success
    Row("train-member-removed", member_removed, 0, "damaged sample", skipped_one("missing_member")),
    Row("train-member-40-bins", member_40_bins, 0, "damaged sample", skipped_one("shape_mismatch")),
    Row("train-member-nan", member_nan, 0, "damaged sample", skipped_one("non_finite")),
    Row("train-member-bad-json", member_bad_json, 0, "damaged sample", skipped_one("bad_json")),
    Row("train-shards-halved", all_halved, 0, "past_end_of_truncated_shard", check_halved),
    Row("train-shards-truncated-to-nothing", all_truncated, 2, "no usable training utterance"),
    Row("train-shards-garbage-content", all_garbage, 2, "read no usable utterance"),
    Row("train-shard-deleted", shard_deleted, 0, "shard_missing"),
    Row("train-index-garbage", garbage_file("index.parquet"), 2, "cannot read"),
    Row("train-meta-garbage", garbage_file("meta.json"), 2, "is damaged"),
    Row("train-shards-missing", flag("train", "--shards", "{out}/none", "--out", "{out}/r"), 2, "not found"),
    Row("eval-truncated-set", eval_truncated, 2, "no readable utterance"),
    Row("eval-one-member-missing", eval_one_missing, 1, "1 of", check_eval_partial),
    Row("train-dev-unreadable", dev_unreadable, 2, "no readable dev utterance"),
    Row("train-dev-one-unreadable", dev_one_missing, 0, "unreadable", check_dev_partial),
    # prep: the input is checked whole first; output is tied to its content; kills are recoverable
    Row("prep-json-truncated", corpus_with(lambda b: b[: len(b) // 2]), 2, "truncated"),
    Row("prep-json-invalid", corpus_with(lambda b: b.replace(b":", b";", 3)), 2, "not valid JSON"),
    Row("prep-json-wrong-schema", corpus_with(lambda b: b'{"songs": []}'), 2, "GigaSpeech schema"),
    Row("prep-json-entries-malformed", corpus_with(lambda b: json.dumps(
        {"audios": [{"aid": a["aid"]} for a in json.loads(b)["audios"]]}).encode()), 2, "GigaSpeech schema"),
    Row("prep-corpus-changed-since", corpus_changed, 2, "has changed"),
    Row("prep-manifests-killed", manifests_interrupted, 0, "wrote", check_same_shards),
    Row("prep-cuts-truncated", cuts_truncated, 2, "cannot read"),
    Row("prep-out-under-a-file", lambda c: prep_args(c, out=c.corpus / "GigaSpeech.json" / "o"), 2,
        "Not a directory"),
    Row("prep-out-unwritable", lambda c: prep_args(c, out=unwritable_dir(c)), 2, "not writable"),
    # training runs: writable before the first step
    Row("train-checkpoints-dir-is-a-file", ckpt_dir_is_file, 2, "not writable"),
    Row("train-out-unwritable", lambda c: train_args(c.shards, unwritable_dir(c)), 2, "not writable"),
    Row("train-resume-without-checkpoint", lambda c: train_args(c.shards, c.out, "--resume"), 2, "no checkpoint"),
    # checkpoints never run code
    Row("transcribe-crafted-checkpoint", lambda c: ["transcribe", "--checkpoint", str(crafted_checkpoint(c)),
                                                    str(c.corpus / "GigaSpeech.json")], 2, "refusing to load",
        check_not_executed),
    Row("eval-crafted-checkpoint", lambda c: ["eval", "--checkpoint", str(crafted_checkpoint(c)), "--shards",
                                              str(c.dev)], 2, "refusing to load", check_not_executed),
    Row("train-resume-crafted-checkpoint", crafted_resume, 2, "refusing to load", check_not_executed),
    Row("transcribe-old-format-checkpoint", old_format_checkpoint, 0, "a.wav\t"),
    Row("transcribe-damaged-checkpoint", lambda c: ["transcribe", "--checkpoint", str(c.corpus / "GigaSpeech.json"),
                                                    "x.wav"], 2, "cannot read checkpoint"),
    # transcribe: per-file errors, the other files still transcribed, exit 1
    Row("transcribe-short-missing-garbage-stereo", transcribe_mixed, 1, "audio is too short", check_mixed),
    # invalid values name the valid range
    Row("flag-batch-size-0", flag("train", "--shards", "{shards}", "--out", "{out}", "--batch-size", "0"), 2,
        "x>=1"),
    Row("flag-max-steps-negative", flag("train", "--shards", "{shards}", "--out", "{out}", "--max-steps", "-1"), 2,
        "x>=1"),
    Row("flag-lr-zero", flag("train", "--shards", "{shards}", "--out", "{out}", "--lr", "0"), 2, "x>0"),
    Row("flag-epochs-0", flag("train", "--shards", "{shards}", "--out", "{out}", "--epochs", "0"), 2, "x>=1"),
    Row("set-lr-negative", flag("train", "--shards", "{shards}", "--out", "{out}", "--set", "optim.lr=-1"), 2,
        "must be > 0"),
    Row("set-workers-negative", flag("train", "--shards", "{shards}", "--out", "{out}", "--set",
                                     "data.num_workers=-1"), 2, "in [0, 256]"),
    Row("set-freq-conv-even-kernel", flag("train", "--shards", "{shards}", "--out", "{out}", "--set",
                                          "model.freq_conv=8", "--set", "model.freq_conv_kernel=4"), 2,
        "an odd number in [1, 79]"),
    Row("set-freq-conv-layers-odd-pool", flag("train", "--shards", "{shards}", "--out", "{out}", "--set",
                                              "model.freq_conv_layers=2", "--set", "model.freq_pool=3"), 2,
        "must be even with model.freq_conv_layers=2"),
    Row("set-unknown-field", flag("train", "--shards", "{shards}", "--out", "{out}", "--set", "optim.lrr=1"), 2,
        "unknown config field"),
    Row("set-ctc-unknown", flag("train", "--shards", "{shards}", "--out", "{out}", "--set", "train.ctc=cudnn"), 2,
        "train.ctc must be auto, aten or triton"),
    Row("set-ctc-triton-on-cpu", flag("train", "--shards", "{shards}", "--out", "{out}", "--set", "train.ctc=triton",
                                      "--dry-run"), 2, "train.ctc=triton: "),
    Row("flag-chunk-frames-0", flag("transcribe", "--checkpoint", "{ckpt}", "--chunk-frames", "0", "x.wav"), 2,
        "x>=1"),
    Row("flag-beam-negative", flag("eval", "--checkpoint", "{ckpt}", "--shards", "{shards}", "--beam", "-1"), 2,
        "x>=0"),
    Row("flag-prep-jobs-0", flag("prep", "--cuts", "x", "--out", "{out}", "--jobs", "0"), 2, "x>=1"),
    Row("flag-bench-lengths", flag("bench", "model", "--lengths", "100,zero"), 2, "comma-separated integers"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_scenario(row: Row, synth_corpus: Path, synth_shards: Path, synth_dev: Path, tiny_run: Path,
                  tmp_path: Path) -> None:
    c = Ctx(tmp_path, synth_corpus, synth_shards, synth_dev, tiny_run)
    args = row.setup(c)
    code, output = run_cli(*args)  # an exception escaping the CLI (a traceback) fails the test here
    assert code == row.code, output
    assert row.fragment in output, output
    errors = [line for line in output.splitlines() if line.startswith(("error:", "Error:"))]  # ours, click's
    assert all(len(e) < 400 for e in errors)
    if row.code == 2:
        assert len(errors) == 1, output
    if row.check:
        row.check(c, output)
    assert_complete(c.out, c.notes.get("planted", []))


# ------------------------------------------------------------------ scenarios that need their own process
def run_limited(args: list[str], fsize: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``lmuasr ARGS`` in a subprocess; ``fsize``: the largest file it may write (EFBIG past it, like a full disk)."""
    def limits() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing the process
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmu_asr.cli", *args], capture_output=True, text=True,
                          preexec_fn=limits, env=env, timeout=timeout)


def test_disk_full_while_writing_a_shard(synth_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_limited(["prep", "--corpus-dir", str(synth_corpus), "--subset", "xs", "--out", str(out),
                        "--shard-frames", "3000", "--no-progress"], fsize=200_000)
    assert proc.returncode == 2 and "File too large" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert_complete(out)
    assert not (out / "index.parquet").exists()


def test_disk_full_while_writing_a_checkpoint_keeps_the_old_one(synth_shards: Path, tiny_run: Path,
                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = run_limited(train_args(synth_shards, run, "--resume", "--max-steps", "6"), fsize=len(before) // 2)
    assert proc.returncode == 2 and "File too large" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert last.read_bytes() == before  # the previous checkpoint is intact
    assert_complete(run)


def test_kill_9_inside_lhotse_manifest_writing_then_rerun(synth_corpus: Path, synth_shards: Path,
                                                          tmp_path: Path) -> None:
    """A real kill -9 as soon as lhotse starts writing its manifests; the rerun must give the same shards."""
    out = tmp_path / "out"
    args = ["prep", "--corpus-dir", str(synth_corpus), "--subset", "xs", "--out", str(out), "--shard-frames",
            "3000", "--shuffle-group", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lmu_asr.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    partial = out / ".prep" / "manifests.partial"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not any(partial.glob("*.jsonl.gz")):
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    code, output = run_cli(*args)
    assert code == 0, output
    for tar in synth_shards.glob("shard-*.tar"):
        assert (out / tar.name).read_bytes() == tar.read_bytes()
