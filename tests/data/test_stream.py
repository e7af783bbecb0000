"""Training from shard URLs (webdataset streaming) against a local HTTP server started by the test."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lmu_asr.config import DataConfig
from lmu_asr.data.sampler import bucket_lengths, capacity, eval_plan, eval_setup
from lmu_asr.data.shards import ShardSet
from lmu_asr.data.stream import RemoteShards, eval_stream_plan, interleave
from tests.helpers import run_cli
from tests.test_robustness import rewrite_tar

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) URLs with curl")


@pytest.fixture
def served(synth_shards: Path, tmp_path: Path, monkeypatch) -> Iterator[tuple[str, Path]]:
    """A copy of the synthetic shards behind http://127.0.0.1:PORT/ (and a fresh remote-index cache)."""
    root = tmp_path / "www"
    shutil.copytree(synth_shards, root, ignore=shutil.ignore_patterns(".index-cache-*"))
    monkeypatch.setenv("LMU_ASR_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    n = len(list(root.glob("shard-*.tar")))
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..{n - 1:06d}}}.tar", root
    finally:
        server.shutdown()


def train(shards: str | Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli("train", "--shards", str(shards), "--out", str(out), "--preset", "cpu-tiny", "--no-progress",
                   *extra)


def records(run: Path) -> list[tuple]:
    return [(r["step"], r["epoch"], r["loss"], r["utterances"])
            for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def test_one_stream_trains_exactly_as_the_local_files(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    assert train(url, tmp_path / "url", "--max-steps", "5", "--workers", "0")[0] == 0
    assert train(root, tmp_path / "local", "--max-steps", "5", "--workers", "0")[0] == 0
    assert records(tmp_path / "url") == records(tmp_path / "local")  # bit-identical losses
    code, output = train(f"pipe:cat {root}/shard-{{000000..000003}}.tar", tmp_path / "pipe", "--max-steps", "5",
                         "--workers", "0")
    assert code == 0 and records(tmp_path / "pipe") == records(tmp_path / "local")
    code, output = train(f"file:{root}/shard-{{000000..000003}}.tar", tmp_path / "file", "--max-steps", "2",
                         "--workers", "1")
    assert code == 0, output


def test_two_workers_cover_the_epoch_once_and_resume_exactly(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    assert train(url, tmp_path / "whole", "--epochs", "2", "--workers", "2")[0] == 0
    whole = records(tmp_path / "whole")
    usable = len(ShardSet.open(root))
    assert sum(r[3] for r in whole if r[1] == 0) == sum(r[3] for r in whole if r[1] == 1) == usable
    assert train(url, tmp_path / "cut", "--epochs", "2", "--workers", "2", "--max-steps", "3")[0] == 0
    code, output = run_cli("train", "--shards", url, "--out", str(tmp_path / "cut"), "--resume", "--set",
                           "train.max_steps=0", "--workers", "2", "--no-progress")
    assert code == 0, output
    assert records(tmp_path / "cut") == whole


def test_a_sample_missing_from_a_streamed_shard_is_counted(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    victim = sorted(root.glob("shard-*.tar"))[1]
    names = []
    rewrite_tar(victim, lambda name, data: names.append(name) or (None if len(names) == 3 else data))
    key = names[2].split(".")[0]
    code, output = train(url, tmp_path / "run", "--epochs", "1", "--workers", "0")
    assert code == 0 and "1 damaged sample(s) skipped" in output, output
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "damaged.jsonl").read_text().splitlines()]
    assert record["key"] == key and record["reason"] == "missing_member"


def test_url_errors_are_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMU_ASR_CACHE", str(tmp_path / "cache"))
    code, output = train("http://127.0.0.1:9/shard-{000000..000001}.tar", tmp_path / "r")
    assert code == 2 and output.count("\n") == 1
    assert "cannot fetch meta.json from http://127.0.0.1:9/meta.json: curl exited 7 (cannot connect" in output
    code, output = train(f"pipe:cat {tmp_path}/nowhere/shard-{{000000..000001}}.tar", tmp_path / "r")
    assert code == 2 and output.count("\n") == 1
    assert f"cannot fetch meta.json from pipe:cat {tmp_path}/nowhere/meta.json: the command exited 1" in output
    code, output = train("https://host/data/notashard", tmp_path / "r")
    assert code == 2 and "expected URLs of .tar shards (e.g. https://host/shard-{000000..000009}.tar)" in output


def test_siblings_and_merge_order() -> None:
    r = RemoteShards("pipe:aws s3 cp s3://b/x/shard-000003.tar -", ["pipe:aws s3 cp s3://b/x/shard-000003.tar -"])
    assert r.sibling("meta.json") == "pipe:aws s3 cp s3://b/x/meta.json -" and r.names == ["shard-000003.tar"]
    h = RemoteShards("https://h/p/shard-{1..2}.tar", ["https://h/p/shard-1.tar", "https://h/p/shard-2.tar"])
    assert h.sibling("index.parquet") == "https://h/p/index.parquet"
    assert h.label == "p" and r.label == "x"  # reports are named after the shards' folder
    assert RemoteShards("file:shard-1.tar", ["file:shard-1.tar"]).label == "remote"  # no folder in the URL
    assert RemoteShards("pipe:cat s/shard-1.tar", ["pipe:cat s/shard-1.tar"]).label == "s"
    assert interleave([[1, 2, 3], [4], [5, 6]]) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]


def test_eval_and_dev_shards_from_urls_score_what_the_folder_scores(served: tuple[str, Path], synth_shards: Path,
                                                                      tmp_path: Path) -> None:
    """Validation during training, ``eval`` and the folder they were served from: the same utterances, the
    same hypotheses, the same WER (the streamed plan batches differently, so the loss agrees to rounding)."""
    url, _ = served
    run = tmp_path / "run"
    code, output = train(synth_shards, run, "--dev-shards", url, "--epochs", "1", "--workers", "0")
    assert code == 0, output
    (dev_record,) = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    ckpt = next((run / "checkpoints").glob("checkpoint_epoch_0*.pt"))
    reports = {}
    for name, spec in (("url", url), ("local", str(synth_shards))):
        code, output = run_cli("eval", "--checkpoint", str(ckpt), "--shards", spec, "--report",
                               str(tmp_path / f"{name}.json"))
        assert code == 0, output
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    url_res, local_res = reports["url"], reports["local"]
    code, output = train(synth_shards, tmp_path / "dry", "--dev-shards", url, "--dry-run")
    assert code == 0 and f"dev: {url} ({url_res['utterances']} utterances)" in output  # the URLs, not the cache
    assert url_res["utterances"] == local_res["utterances"] == len(ShardSet.open(synth_shards))
    assert sorted(url_res["hypotheses"]) == sorted(local_res["hypotheses"])
    assert url_res["wer"] == local_res["wer"] == dev_record["dev_wer"]
    assert url_res["per_speaker"] == local_res["per_speaker"] and len(url_res["per_speaker"]) > 1  # fetched index
    assert url_res["loss"] == pytest.approx(local_res["loss"], rel=1e-4)
    assert dev_record["dev_loss"] == pytest.approx(local_res["loss"], rel=1e-4)


def test_streamed_eval_plan_covers_every_utterance_once_and_holds_little(tmp_path: Path) -> None:
    """Two ranks of two workers each over 4,000 utterances in 12 shards (an index only): every readable
    utterance in exactly one batch; a worker never holds more samples than one batch per bucket (about 240,
    not its ~1,000: a length-sorted plan would have to hold them all); one stream pads exactly as the folder's
    length-sorted plan."""
    from lmu_asr.bench.synthetic import make_sparse_files, write_synthetic_shards

    make_sparse_files(write_synthetic_shards(tmp_path / "s", 4000, 12, with_data=False))
    shards = ShardSet.open(tmp_path / "s")
    cfg = DataConfig(batch_frames=8000)
    seen = []
    for rank in range(2):
        plans, shard_lists, _ = eval_stream_plan(shards, cfg, 2, rank, 2, workers=2)
        for plan, ids in zip(plans, shard_lists, strict=True):
            stream = [i for s in ids for i in sorted(np.flatnonzero(shards.shard_id == s),
                                                     key=lambda i: shards.position[i])]
            where = {i: k for k, i in enumerate(stream)}
            done = np.zeros(len(stream), np.int64)  # when each sample's batch goes out: batches leave in plan
            out = 0  # order, each as soon as its last member has arrived (StreamDataset)
            for b in plan:
                out = max(out, max(where[int(i)] for i in b.indices))
                for i in b.indices:
                    done[where[int(i)]] = out
                seen += b.indices.tolist()
            # held once sample t has arrived: the t + 1 arrived so far, less those whose batch went out by then
            held = np.arange(1, len(stream) + 1) - np.bincount(done, minlength=len(stream)).cumsum()
            eval_cfg, _ = eval_setup(shards, cfg)
            assert 0 < held.max() <= sum(capacity(eval_cfg, b) for b in bucket_lengths(eval_cfg, 2)) < len(stream) / 3
    assert sorted(seen) == np.flatnonzero(shards.usable).tolist()
    (plan,), _, stats = eval_stream_plan(shards, cfg, 2, 0, 1, workers=1)
    local, local_stats = eval_plan(shards, cfg, 2)
    assert stats.padded_frames == local_stats.padded_frames and len(plan) == len(local)


def test_a_sample_missing_from_a_streamed_eval_shard_is_reported(served: tuple[str, Path], tiny_run: Path,
                                                                 tmp_path: Path) -> None:
    url, root = served
    victim = sorted(root.glob("shard-*.tar"))[2]
    names = []
    rewrite_tar(victim, lambda name, data: names.append(name) or (None if len(names) == 1 else data))
    key = names[0].split(".")[0]
    report = tmp_path / "r.json"
    code, output = run_cli("eval", "--checkpoint", str(tiny_run / "checkpoints" / "last.pt"), "--shards", url,
                           "--report", str(report))
    assert code == 1 and "1 of 60 utterances could not be read" in output, output
    res = json.loads(report.read_text())
    assert res["utterances"] == 59 and res["damaged"]["examples"][0]["key"] == key
    assert res["damaged"]["by_reason"] == {"missing_member": 1}


def test_verify_checks_the_copy_behind_the_urls(served: tuple[str, Path], tmp_path: Path) -> None:
    """An uploaded copy is verified where it lives: intact, a damaged member (key and reason), and a shard the
    server no longer has (its utterances unreadable, with curl's reason; never a traceback)."""
    url, root = served
    code, output = run_cli("verify", url, "--report", str(tmp_path / "ok.json"), "--no-progress")
    assert code == 0, output
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert ok["ok"] == ok["utterances"] == len(ShardSet.open(root)) and ok["directory"] == url
    shards = sorted(root.glob("shard-*.tar"))
    names = []
    rewrite_tar(shards[0], lambda name, data: names.append(name) or (
        json.dumps({**json.loads(data), "text": "X"}).encode() if name.endswith(".json") and len(names) < 3
        else data))
    gone = ShardSet.open(root)
    lost = int((gone.shard_id == gone.shard_names.index(shards[-1].name)).sum())
    shards[-1].unlink()
    code, output = run_cli("verify", url, "--report", str(tmp_path / "bad.json"), "--no-progress")
    assert code == 1 and "Traceback" not in output, output
    bad = json.loads((tmp_path / "bad.json").read_text())
    # (the shorter json member also moves the next member: an offset mismatch; the lost shard moves the statistics)
    assert bad["by_reason"] == {"text_mismatch": 1, "offset_mismatch": 1, "shard_unreadable": lost,
                                "stats_mismatch": 1}, bad["by_reason"]
    assert bad["ok"] == ok["ok"] - 1 - lost
    unreadable = next(e for e in bad["examples"] if e["reason"] == "shard_unreadable")
    assert unreadable["detail"] == f"{shards[-1].name}: curl exited 22 (the server answered with an HTTP error " \
                                   "(no such file, or no permission))"
