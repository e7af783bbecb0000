"""Writing files so that a kill, a full disk or a permission error never leaves half a file under its final name.

Every output of this project (shards, indexes, checkpoints, reports, logs' rewrites) goes through a temporary name
in the same directory, is flushed and fsynced, and is renamed into place; on any failure the temporary file is
removed and the previous file, if any, is left intact. :func:`check_writable` is the up-front probe that lets a
long job refuse an unwritable output folder before it has spent an hour of compute.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lmu_asr import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only when the block completes (fsynced, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_write_with(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(f)`` into a temporary file that is renamed to ``path`` only when it returns."""
    with atomic_open(path) as f:
        write(f)


def check_writable(directory: str | Path, what: str) -> Path:
    """Create ``directory`` if needed and prove a file can be written, synced and removed there (one-line error)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe.", delete=True) as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise UserError(f"{what} {directory} is not writable: {err.strerror or err}") from None
    return directory


def os_error_message(err: OSError) -> str:
    """One line for an OSError: what failed, on which path (no traceback)."""
    text = err.strerror or type(err).__name__
    if getattr(err, "filename", None):
        text += f": {err.filename}"
    if getattr(err, "filename2", None):
        text += f" -> {err.filename2}"
    return text
