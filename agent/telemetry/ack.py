"""The fleet's telemetry ack (``{root}/telemetry/ack``): ``{"v": 1, "through_seq": N}``.

Parsed strictly and small, because it arrives from the broker like any message: a payload
that is not exactly this is refused with a stable reason code (counted and logged by the
caller), never raised into the dispatcher.
"""

from __future__ import annotations

import json

MAX_ACK_BYTES = 1024  # the real thing is about 30 bytes


class BadAck(Exception):
    """A payload on the ack topic that is not an ack; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_ack(payload: bytes) -> int:
    """``through_seq`` of an ack, or :class:`BadAck` (``too_large``, ``bad_json``,
    ``bad_version``, ``bad_through_seq``)."""
    if len(payload) > MAX_ACK_BYTES:
        raise BadAck("too_large", f"{len(payload)} bytes, at most {MAX_ACK_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadAck("bad_json", "not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise BadAck("bad_json", "not a JSON object")
    v = doc.get("v")
    if type(v) is not int or v != 1:  # not True, not 1.0
        raise BadAck("bad_version", f"v must be 1, got {v!r}"[:100])
    seq = doc.get("through_seq")
    if type(seq) is not int or seq < 0:  # bool is an int subclass: type() keeps it out
        raise BadAck("bad_through_seq", f"through_seq must be a non-negative integer, got {seq!r}"[:100])
    return seq
