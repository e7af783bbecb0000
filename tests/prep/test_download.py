"""lmuasr download against a release served on 127.0.0.1: the real lhotse/speechcolab downloader, an encrypted
release built by the test (files.yaml with md5s, AES objects as GigaSpeech publishes them), resume, and the
one-line errors (wrong password, no network, unknown subset)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_cli

PASSWORD = "open sesame"


def encrypt(data: bytes, password: str) -> bytes:
    """What ``openssl enc -aes-256-cbc -pbkdf2`` writes, which speechcolab decrypts: Salted__, salt, ciphertext."""
    from Crypto.Cipher import AES

    salt = os.urandom(8)
    d = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 10000, 48)
    pad = 16 - len(data) % 16
    return b"Salted__" + salt + AES.new(d[:32], AES.MODE_CBC, d[32:]).encrypt(data + bytes([pad]) * pad)


@pytest.fixture
def release(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "release"
    (root / "audio" / "podcast").mkdir(parents=True)
    corpus = {"audios": [{"aid": "POD0000000001", "path": "audio/podcast/P0000/POD0000000001.opus",
                          "subsets": ["{XS}"], "segments": []}]}
    objects = {"GigaSpeech.json.gz.aes": gzip.compress(json.dumps(corpus).encode())}
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as t:
        info = tarfile.TarInfo("POD0000000001.opus")
        info.size = 5
        t.addfile(info, io.BytesIO(b"OPUS!"))
    objects["audio/podcast/P0000.tgz.aes"] = tgz.getvalue()
    listing = {"metadata": {}, "youtube": {}, "podcast": {}, "audiobook": {}}
    for path, data in objects.items():
        blob = encrypt(data, PASSWORD)
        (root / path).write_bytes(blob)
        listing["podcast" if path.startswith("audio/") else "metadata"][path] = hashlib.md5(blob).hexdigest()
    (root / "files.yaml").write_text(yaml.safe_dump(listing))
    (root / "TERMS_OF_ACCESS").write_text("test terms\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(autouse=True)
def no_countdown(monkeypatch) -> None:
    """speechcolab counts down 5 s after printing the terms; the tests do not wait for it."""
    import speechcolab.datasets.gigaspeech as g

    monkeypatch.setattr(g.time, "sleep", lambda s: None)


def test_download_decrypts_verifies_and_resumes(release: str, tmp_path: Path) -> None:
    out = tmp_path / "gs"
    code, output = run_cli("download", "--subset", "xs", "--out", str(out), "--password", PASSWORD, "--host", release)
    assert code == 0, output
    assert json.loads((out / "GigaSpeech.json").read_text())["audios"][0]["aid"] == "POD0000000001"
    assert (out / "audio" / "podcast" / "P0000" / "POD0000000001.opus").read_bytes() == b"OPUS!"
    stamp = (out / "audio" / "podcast" / "P0000.tgz.aes").stat().st_mtime_ns
    code, output = run_cli("download", "--subset", "xs", "--out", str(out), "--password", PASSWORD, "--host", release)
    assert code == 0 and "Skipping" in output  # md5 matches: not fetched again
    assert (out / "audio" / "podcast" / "P0000.tgz.aes").stat().st_mtime_ns == stamp


def test_wrong_password_is_one_line(release: str, tmp_path: Path) -> None:
    code, output = run_cli("download", "--subset", "xs", "--out", str(tmp_path / "gs"), "--password", "wrong",
                           "--host", release)
    assert code == 2 and "is --password right?" in output and "Traceback" not in output


@pytest.mark.parametrize("args,message", [
    (["--subset", "xs", "--password", "p", "--host", "http://127.0.0.1:9"], "cannot download GigaSpeech"),
    (["--subset", "xxl", "--password", "p"], "unknown GigaSpeech subset"),
    (["--subset", "xs"], "--password is required"),
    (["--subset", "xs", "--password", "p", "--host", "ftp-of-mine"], "unknown --host"),
])
def test_download_user_errors(tmp_path: Path, args: list[str], message: str, monkeypatch) -> None:
    monkeypatch.delenv("GIGASPEECH_PASSWORD", raising=False)
    code, output = run_cli("download", "--out", str(tmp_path / "gs"), *args)
    assert code == 2 and message in output and [x for x in output.splitlines() if x.startswith("error:")]
