"""Signed metadata: refresh TUF from the trusted root and find a target's signed info.

python-tuf's ngclient does the verification; this module maps its errors to the
update reason codes, refuses network updates on a clock earlier than the trusted root,
and names the target file the way ngclient does (``HASH.NAME`` under consistent snapshots).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater

from agent.packs.fetch import PackFetcher
from agent.packs.tuf_sideload import relax_expiry
from agent.packs.verify import UpdateRejected
from model_packs.layout import CREATED_FIELD, consistent_path


def check_clock(tuf_dir: Path, now: datetime) -> None:
    """A clock before the trusted root was made would take expired metadata for fresh:
    network updates wait for a sane clock (a sideload is the operator's own copy)."""
    created = json.loads((tuf_dir / "root.json").read_text())["signed"].get(CREATED_FIELD)
    if created and now < datetime.fromisoformat(created):
        raise UpdateRejected(
            "clock_behind",
            f"the device clock ({now:%Y-%m-%d %H:%M}Z) is earlier than the trusted root "
            f"({created}); set the time (NTP, RTC) before updating over the network",
        )


def refresh_target(
    tuf_dir: Path,
    base_url: str,
    path: str,
    fetcher: PackFetcher,
    sideload: bool,
    instead: Callable[[TargetFile], str | None] | None = None,
) -> TargetFile:
    """Refresh metadata from the trusted root in ``tuf_dir`` and return ``path``'s signed info,
    or, where ``instead`` names another target for it (a variant), that target's."""
    if not (tuf_dir / "root.json").exists():
        raise UpdateRejected(
            "no_trust",
            f"no trusted root in {tuf_dir}: provision the device first (updates.trusted_root: "
            "the fleet's root.json, installed at the first start; docs/provisioning.md)",
        )
    if not sideload:
        check_clock(tuf_dir, datetime.now(UTC))
    updater = Updater(
        metadata_dir=str(tuf_dir),
        metadata_base_url=f"{base_url}/metadata/",
        target_base_url=f"{base_url}/targets/",
        fetcher=fetcher,
        bootstrap=None,  # the trusted root.json already in metadata_dir
    )
    if sideload:
        relax_expiry(updater)
    try:
        updater.refresh()
        info = updater.get_targetinfo(path)
        other = instead(info) if info is not None and instead is not None else None
        if other is not None:
            path, info = other, updater.get_targetinfo(other)
    except tuf_errors.ExpiredMetadataError as exc:
        raise UpdateRejected("expired_metadata", str(exc)) from None
    except (tuf_errors.BadVersionNumberError, tuf_errors.EqualVersionNumberError) as exc:
        raise UpdateRejected("replayed_metadata", str(exc)) from None
    except tuf_errors.UnsignedMetadataError as exc:
        raise UpdateRejected("bad_signature", str(exc)) from None
    except tuf_errors.RepositoryError as exc:
        raise UpdateRejected("bad_metadata", f"{type(exc).__name__}: {exc}") from None
    except (tuf_errors.DownloadError, OSError) as exc:
        raise UpdateRejected("unreachable", f"repository {base_url}: {exc}") from None
    if info is None:
        raise UpdateRejected("unknown_target", f"{path} is not a signed target of the repository")
    return info


def target_url(base_url: str, tuf_dir: Path, info: TargetFile) -> str:
    """Where the target's bytes are: ``DIR/HASH.NAME`` when the trusted root (as refreshed)
    has consistent snapshots on (TUF 5.7.3, as ngclient asks), else ``DIR/NAME``."""
    root: Root = Metadata[Root].from_file(str(tuf_dir / "root.json")).signed
    path = (
        consistent_path(info.path, next(iter(info.hashes.values())))
        if root.consistent_snapshot
        else info.path
    )
    return f"{base_url}/targets/{path}"
