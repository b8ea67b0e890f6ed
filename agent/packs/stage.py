"""Unpack a verified pack tarball into the staging directory, safely, on Python 3.11.2.

Debian bookworm and Raspberry Pi OS ship Python 3.11.2, whose ``tarfile`` has no
extraction filters, so nothing here calls ``extract``: members are checked first (plain
top-level files only, a bounded count and total size) and each one is copied out by hand
into a file this code creates, so a link, device or path can never be written.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
from pathlib import Path

from agent.packs.verify import UpdateRejected, check_members
from model_packs.errors import PackError
from model_packs.fileio import fsync_dir
from model_packs.format import Manifest, verify_pack

MAX_PACK_BYTES = 4 << 30


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise UpdateRejected("bad_pack", f"tar member {member.name!r} has no data")
    fd = os.open(dest / member.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with src, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _make_durable(staging: Path) -> None:
    """fsync every unpacked file, then the directory: a power cut after the switch must
    find the slot's bytes, not a file of zeros. Done after all writes, so the kernel writes
    back one file while the next one is still being unpacked."""
    for path in staging.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(staging)


def unpack(part: Path, staging: Path, name: str, version: str) -> Manifest:
    """Unpack ``part`` into the (fresh) ``staging`` dir and verify it as ``name@version``."""
    try:
        with tarfile.open(part, "r:") as tar:
            for member in check_members(tar.getmembers(), MAX_PACK_BYTES):
                _extract(tar, member, staging)
        _make_durable(staging)
        manifest = verify_pack(staging)
    except PackError as exc:
        raise UpdateRejected("bad_pack", exc.message) from None
    except OSError as exc:
        code = "disk_full" if exc.errno == errno.ENOSPC else "bad_pack"
        raise UpdateRejected(code, f"unpacking failed: {exc}") from None
    except tarfile.TarError as exc:
        raise UpdateRejected("bad_pack", f"pack is not a valid tar: {exc}") from None
    if (manifest.name, manifest.version) != (name, version):
        raise UpdateRejected("bad_pack", f"pack manifest says {manifest.name}@{manifest.version}")
    return manifest
