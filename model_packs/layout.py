"""How packs appear in the fleet's TUF repository: names, target paths, and the fleet's
own field in the signed root. The fleet writes these and the device reads them, so each
is defined here once.

- A pack is the TUF target ``packs/{name}/{version}.tar`` (docs/protocol.md, updates); an update
  instruction names it ``NAME@VERSION``. That target is the release's base (it runs anywhere);
  a variant of the same release for some hardware (model_packs/hardware.py) is the target
  ``packs/{name}/{version}/{variant}.tar``, listed in the base target's signed custom metadata.
- With consistent snapshots (TUF spec 5.7.3) the file is stored and fetched as
  ``packs/{name}/{HASH}.{version}.tar``: the hash goes on the basename, in the same
  directory, exactly as python-tuf's ngclient ``Updater.download_target`` builds it.
- The root carries ``x-edge-created`` (when the repository was made) so a device whose
  clock is earlier than that knows it cannot judge expiry.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from model_packs.versions import VersionError, parse_version

CREATED_FIELD = "x-edge-created"
PACKS_DIR = "packs"
TAR_SUFFIX = ".tar"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)


class TargetError(ValueError):
    """A target name that is not ``NAME@VERSION`` with a valid name and SemVer version."""

    code = "bad_target"


class PackTarget(NamedTuple):
    """A parsed ``NAME@VERSION``; unpacks as ``name, version, path``."""

    name: str
    version: str
    path: str


def is_pack_name(name: str) -> bool:
    """Lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64."""
    return _NAME.fullmatch(name) is not None


def target_path(name: str, version: str) -> str:
    """The TUF target path of a pack (the key in targets metadata)."""
    return f"{PACKS_DIR}/{name}/{version}{TAR_SUFFIX}"


def variant_path(name: str, version: str, variant: str) -> str:
    """The TUF target path of a release's variant (``variant`` as :func:`is_pack_name`)."""
    return f"{PACKS_DIR}/{name}/{version}/{variant}{TAR_SUFFIX}"


def parse_target(target: str) -> PackTarget:
    """``NAME@VERSION`` -> (name, version, target path); raises :class:`TargetError`."""
    name, sep, version = target.partition("@")
    if not sep or not is_pack_name(name):
        raise TargetError(f"target {target[:100]!r} must be NAME@VERSION with a lowercase pack name")
    try:
        parse_version(version)
    except VersionError as exc:
        raise TargetError(f"target {target[:100]!r}: {exc}") from None
    return PackTarget(name, version, target_path(name, version))


def pack_of_path(path: str) -> tuple[str, str] | None:
    """The (name, version) of a pack target path, or None for any other target."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != PACKS_DIR or not parts[2].endswith(TAR_SUFFIX):
        return None
    name, version = parts[1], parts[2][: -len(TAR_SUFFIX)]
    return (name, version) if is_pack_name(name) else None


def consistent_path(path: str, hash_hex: str) -> str:
    """Where a consistent-snapshot repository stores target ``path``: ``hash_hex`` is the
    first hash its targets metadata lists (ngclient takes the first; the fleet lists only
    sha256)."""
    dirname, sep, basename = path.rpartition("/")
    return f"{dirname}{sep}{hash_hex}.{basename}"
