"""Training from shard URLs (webdataset streaming) against a local HTTP server started by the test."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmu_asr.data.stream import RemoteShards, interleave
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
    from lmu_asr.data.shards import ShardSet

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
    assert code == 2 and "cannot fetch meta.json" in output and output.count("\n") == 1
    code, output = train("https://host/data/notashard", tmp_path / "r")
    assert code == 2 and "expected URLs of .tar shards" in output


def test_siblings_and_merge_order() -> None:
    r = RemoteShards("pipe:aws s3 cp s3://b/x/shard-000003.tar -", ["pipe:aws s3 cp s3://b/x/shard-000003.tar -"])
    assert r.sibling("meta.json") == "pipe:aws s3 cp s3://b/x/meta.json -" and r.names == ["shard-000003.tar"]
    h = RemoteShards("https://h/p/shard-{1..2}.tar", ["https://h/p/shard-1.tar", "https://h/p/shard-2.tar"])
    assert h.sibling("index.parquet") == "https://h/p/index.parquet"
    assert interleave([[1, 2, 3], [4], [5, 6]]) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]
