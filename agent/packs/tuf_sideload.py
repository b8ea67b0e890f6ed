"""The one place that reaches into python-tuf's private API: sideload expiry.

A sideload (a USB stick) is never fresh, so timestamp and snapshot expiry cannot be
enforced there (python-tuf#2359); every signature, hash, version and root check still is.
ngclient has no option for it, so the two final checks of its trusted metadata set are
replaced by the same checks minus expiry. ``tests/test_tuf_sideload.py`` fails loudly when
a tuf release changes what this relies on; tuf is pinned below 8 for it.
"""

from __future__ import annotations

import structlog
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import Updater

log = structlog.get_logger("edge_agent.update")
RELIES_ON = ("_trusted_set", "_check_final_timestamp", "_check_final_snapshot")


class SideloadUnsupported(RuntimeError):
    """This tuf release no longer has what the sideload expiry rule replaces."""


def relax_expiry(updater: Updater) -> None:
    """Keep every check of ``updater`` except timestamp and snapshot expiry."""
    trusted = getattr(updater, RELIES_ON[0], None)
    if trusted is None or not all(hasattr(trusted, name) for name in RELIES_ON[1:]):
        raise SideloadUnsupported("python-tuf changed its trusted set: review agent/packs/tuf_sideload.py")

    def final_snapshot() -> None:
        expected = trusted.timestamp.snapshot_meta.version
        if trusted.snapshot.version != expected:
            raise tuf_errors.BadVersionNumberError(
                f"Expected snapshot version {expected}, got {trusted.snapshot.version}"
            )

    trusted._check_final_timestamp = lambda: None
    trusted._check_final_snapshot = final_snapshot
    log.warning("sideload_expiry_not_enforced", roles=["timestamp", "snapshot"])
