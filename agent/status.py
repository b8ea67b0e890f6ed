"""The retained status document: the birth message on every connect and state change,
and the last will (the same document with ``"state": "offline"``)."""

from __future__ import annotations

import json
import time

from agent import __version__

CAPABILITIES = ("query", "read", "cmd", "stream")


def status_document(
    device_id: str,
    state: str,
    pack: dict[str, str] | None,
    hardware: tuple[str, ...] = (),
    tags: tuple[str, ...] = (),
) -> bytes:
    """``state`` is online, updating, paused or offline (docs/protocol.md). ``hardware`` (the
    CPU tags release variants are chosen by) and ``tags`` (from the config) let a fleet's
    registry select devices."""
    doc = {
        "v": 1,
        "state": state,
        "device_id": device_id,
        "pack": pack,
        "capabilities": list(CAPABILITIES),
        "agent_version": __version__,
        "hardware": sorted(hardware),
        "tags": list(tags),
        "ts": time.time(),
    }
    return json.dumps(doc).encode()
