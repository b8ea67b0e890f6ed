"""The payloads a simulated device sends, shaped exactly like the agent's (docs/protocol.md).

The fleet may not import the device code (import-linter), so the few shapes it needs are
written again here; tests compare them with the agent's own builders.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fleet.simulator.updates import Refusal
from model_packs.topics import topic_matches

CAPABILITIES = ("query", "read", "cmd", "stream")
MAX_PAYLOAD_BYTES = 8192  # the agent's default limits.max_payload_bytes
_NO_WILDCARDS = re.compile(r"^[^#+\x00]+$")


def encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def status_document(
    device_id: str,
    state: str,
    pack: Mapping[str, str] | None,
    hardware: Sequence[str],
    tags: Sequence[str],
    agent_version: str,
) -> bytes:
    """agent/status.py's document: the same fields in the same order."""
    doc = {
        "v": 1,
        "state": state,
        "device_id": device_id,
        "pack": dict(pack) if pack else None,
        "capabilities": list(CAPABILITIES),
        "agent_version": agent_version,
        "hardware": sorted(hardware),
        "tags": list(tags),
        "ts": time.time(),
    }
    return json.dumps(doc).encode()


def final_reply(rid: str | None, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "id": rid, "type": "final", "seq": 0, **fields}


def error_reply(rid: str | None, code: str, message: str) -> dict[str, Any]:
    return {"v": 1, "id": rid, "type": "error", "seq": 0, "code": code, "message": message}


def request_id(data: Mapping[str, Any]) -> str | None:
    """The envelope's id when usable (1-128 characters for an update instruction)."""
    rid = data.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


def reply_refusal(topic: object, allowed: Sequence[str], topic_prefix: str) -> str | None:
    """The agent's reply policy: why ``topic`` may not carry a reply, or None when it may."""
    if not isinstance(topic, str) or not topic or len(topic) > 256:
        return "not a topic of 1-256 characters"
    if not _NO_WILDCARDS.match(topic) or topic.startswith("$"):
        return "wildcards and '$' topics are never reply topics"
    if topic_matches(f"{topic_prefix.rstrip('/')}/+/#", topic):
        return "inside a device's topic tree"
    if not any(topic_matches(a, topic) for a in allowed):
        return f"not under the allowed reply topics {list(allowed)}"
    return None


def decode_request(payload: bytes) -> dict[str, Any]:
    """The agent's first checks: size (``too_large``) then UTF-8 JSON object (``bad_json``)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Refusal("too_large", f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Refusal("bad_json", f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Refusal("bad_json", "payload must be a JSON object")
    return data
