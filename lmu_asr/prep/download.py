"""``lmuasr download``: GigaSpeech through lhotse's downloader (the official ``speechcolab`` tool underneath).

The corpus is gated: its owners issue the ``--password`` that decrypts the release, and ``--host`` picks the mirror
(``tsinghua``, ``speechocean``, ``magicdata``, or any ``http(s)://`` URL laid out like a release: a local mirror,
or the tests' server). What the library does, and we keep: every object of the release is checked against the
md5 in its ``files.yaml`` and skipped when it is already complete (so a rerun resumes), re-downloaded up to three
times when it is not; a progress bar per object; the terms of access printed before anything is fetched.

What we add: the subset is validated first, and every failure is one line with exit 2: no network or an
unreachable mirror, a refused request, a wrong password (the decrypted object is not a valid archive), an
md5 that never matches, a full disk.
"""

from __future__ import annotations

import logging
import tarfile
import time
import urllib.error
import zlib
from pathlib import Path

from lmu_asr import UserError
from lmu_asr.prep.plan import GIGASPEECH_SUBSETS

log = logging.getLogger(__name__)

HOSTS = ("tsinghua", "speechocean", "magicdata")


def _register_host(host: str) -> str:
    """A mirror by name, or a URL registered with speechcolab under a name of its own."""
    from speechcolab.datasets import gigaspeech

    if host in HOSTS:
        return host
    if host.startswith(("http://", "https://")):
        gigaspeech.url_of_host["lmuasr-mirror"] = host.rstrip("/")
        return "lmuasr-mirror"
    raise UserError(f"unknown --host {host!r}: use {', '.join(HOSTS)} or an http(s):// URL of a mirror")


def download(subset: str, out: Path, password: str, host: str = "tsinghua") -> dict[str, float]:
    """Download (or complete) one subset into ``out``; returns GB on disk and seconds."""
    from lhotse.recipes.gigaspeech import download_gigaspeech

    part = subset.upper()
    if part not in GIGASPEECH_SUBSETS:
        raise UserError(f"unknown GigaSpeech subset {subset!r}; choose from "
                        f"{', '.join(s.lower() for s in GIGASPEECH_SUBSETS)}")
    if not password:
        raise UserError("--password is required: GigaSpeech is gated, its owners issue the password")
    name = _register_host(host)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        download_gigaspeech(password, out, dataset_parts=[part], host=name)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise UserError(f"cannot download GigaSpeech from {host}: {reason} (no network, a wrong --host, or the "
                        "mirror refused the request)") from None
    except (tarfile.ReadError, zlib.error, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"the downloaded release does not decrypt to a valid archive ({type(err).__name__}): "
                        "is --password right?") from None
    except AssertionError as err:  # speechcolab asserts on a missing content-length or files.yaml entry
        raise UserError(f"the mirror's answer is not a GigaSpeech release ({err or 'unexpected content'})") \
            from None
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"gb_on_disk": size / 1e9, "seconds": time.time() - t0}
