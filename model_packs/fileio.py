"""Durable file writes and file hashing, written once for the builder, the fleet and the device.

A power cut must leave either the old file or the new one, never a torn mix: data goes
to a temp file in the same directory (``os.replace`` is atomic only within one file
system), is fsynced, renamed over the target, and the directory is fsynced so the rename
itself survives. The same code covers a killed process, so a kill test covers both.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20  # hashing reads this much at a time: memory stays flat whatever the file size


def fsync_dir(path: Path) -> None:
    """Make the directory entries of ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_temp(path: Path) -> tuple[Path, BinaryIO]:
    """A fresh temp file beside ``path``; O_EXCL so two writers never share one, and
    mode 0666 less the umask, as a plain ``open`` would give (a web server must read it)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, os.fdopen(fd, "wb")


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Stream into a file that appears at ``path`` complete or not at all.

    The parent directory is created if needed. If the body raises, ``path`` is untouched
    and the temp file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fh = _open_temp(path)
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp, fsync, rename, fsync dir)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
