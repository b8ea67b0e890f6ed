"""Untrusted bytes from the broker -> frozen value objects, or :class:`InvalidPayload`.

Anyone allowed to publish on a device's topics can send anything, so every bound is checked
before the data reaches the database: the size, the JSON nesting, the count of values, every
number finite and every integer within 64 bits (PostgreSQL's BIGINT), every field's type.
The device named in a payload must be the topic's: the topic is what the broker's ACL vouches
for, the payload is only what the publisher claims.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from fleet.telemetry.errors import InvalidPayload

MAX_TELEMETRY_BYTES = 64 * 1024  # docs/protocol.md: "a message is at most 64 KiB"
MAX_OTHER_BYTES = 8 * 1024  # a status document or an update event is a few hundred bytes
MAX_RECORDS = 50
MAX_DEPTH = 8  # payload -> records -> record -> data -> requests -> kind -> outcome: 7
MAX_VALUES = 20_000  # a 64 KiB message cannot hold more than about 16k values anyway
MAX_INT = 2**63 - 1
KINDS = ("metrics", "event", "dropped")
STATUS_STATES = ("online", "updating", "paused", "offline")
DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_LABELS = 32  # hardware tags and config tags each
LABEL = re.compile(r"[^\x00-\x20,\x7f]{1,128}")  # no spaces, controls or ',' (the selector's separator)
Json = Any


@dataclass(frozen=True)
class Record:
    seq: int
    ts: float
    kind: str
    data: Mapping[str, Json]

    @property
    def data_json(self) -> str:
        """The stored text: compact and key-sorted, so a redelivery stores identical bytes."""
        return json.dumps(self.data, separators=(",", ":"), sort_keys=True, allow_nan=False)

    def dropped_range(self) -> tuple[int, int] | None:
        if self.kind != "dropped":
            return None
        return int(self.data["from_seq"]), int(self.data["to_seq"])

    def is_update_event(self) -> bool:
        return self.kind == "event" and self.data.get("event") == "update"


@dataclass(frozen=True)
class Batch:
    """One telemetry message: 1 to 50 records of one device, in strictly rising ``seq``."""

    device: str
    records: tuple[Record, ...]


@dataclass(frozen=True)
class StatusDoc:
    device: str
    state: str
    pack_name: str | None
    pack_version: str | None
    agent_version: str | None
    ts: float
    hardware: tuple[str, ...] | None = None  # None: the document has no such field (an older agent)
    tags: tuple[str, ...] | None = None

    @property
    def online(self) -> bool:
        return self.state != "offline"


@dataclass(frozen=True)
class UpdateStatus:
    """One ``update/status`` event. Its ``seq`` restarts with the agent process, so the
    event's identity for redelivery is ``digest``, the hash of the payload's bytes."""

    device: str
    rollout_id: str
    target: str
    seq: int
    state: str
    percent: float | None
    reason_code: str | None
    reason: str | None
    ts: float
    digest: str


# ------------------------------------------------------------------ topics


def split_topic(topic: str, prefix: str) -> tuple[str, str]:
    """``edge/greenhouse-1/update/status`` -> (``greenhouse-1``, ``update/status``)."""
    head = prefix.rstrip("/") + "/"
    if not topic.startswith(head):
        raise InvalidPayload("bad_topic", f"topic {topic!r} is not under {head!r}")
    device, _, leaf = topic[len(head) :].partition("/")
    if not DEVICE_ID.fullmatch(device):
        raise InvalidPayload("bad_topic", f"topic {topic!r} names no valid device id")
    return device, leaf


# ------------------------------------------------------------------ payloads


def parse_telemetry(device: str, raw: bytes) -> Batch:
    doc = _load(raw, MAX_TELEMETRY_BYTES)
    _check_v_and_device(doc, "device", device)
    records = doc.get("records")
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
        raise InvalidPayload("bad_records", f"records: a list of 1 to {MAX_RECORDS} records")
    parsed = tuple(_record(i, r) for i, r in enumerate(records))
    for before, after in pairwise(parsed):
        if after.seq <= before.seq:
            raise InvalidPayload("bad_order", f"records not in rising seq order ({before.seq}, {after.seq})")
    return Batch(device, parsed)


def parse_status(device: str, raw: bytes) -> StatusDoc | None:
    """``None`` for an empty payload: someone cleared the retained document (a
    decommissioned device), which is not an error."""
    if not raw:
        return None
    doc = _load(raw, MAX_OTHER_BYTES)
    _check_v_and_device(doc, "device_id", device)
    state = _field(doc, "state", str)
    if state not in STATUS_STATES:
        raise InvalidPayload("bad_field", f"state: one of {', '.join(STATUS_STATES)}, not {state!r}")
    name, version = _pack(doc.get("pack"))
    agent_version = _optional_text(doc, "agent_version")
    hardware, tags = _labels(doc, "hardware"), _labels(doc, "tags")
    return StatusDoc(device, state, name, version, agent_version, _number(doc, "ts"), hardware, tags)


def _labels(doc: Mapping[str, Json], name: str) -> tuple[str, ...] | None:
    """A list of 0 to MAX_LABELS short strings, or absent (None: the registry keeps what it had)."""
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_LABELS:
        raise InvalidPayload("bad_field", f"{name}: a list of at most {MAX_LABELS} strings")
    for item in value:
        if not isinstance(item, str) or not LABEL.fullmatch(item):
            raise InvalidPayload("bad_field", f"{name}: each 1 to 128 printable characters, no ','")
    return tuple(dict.fromkeys(value))  # duplicates once, order kept


def _pack(pack: Json) -> tuple[str | None, str | None]:
    if pack is None:
        return None, None
    if not isinstance(pack, dict):
        raise InvalidPayload("bad_field", "pack: null or {name, version}")
    return _text(pack, "name"), _text(pack, "version")


def parse_update_status(device: str, raw: bytes) -> UpdateStatus:
    doc = _load(raw, MAX_OTHER_BYTES)
    _check_v_and_device(doc, None, device)
    percent = doc.get("percent")
    if percent is not None:
        percent = _number(doc, "percent")
    return UpdateStatus(
        device=device,
        rollout_id=_text(doc, "rollout_id"),
        target=_text(doc, "target"),
        seq=_integer(doc, "seq"),
        state=_text(doc, "state"),
        percent=percent,
        reason_code=_optional_text(doc, "reason_code"),
        reason=_optional(doc, "reason", str),
        ts=_number(doc, "ts"),
        digest=hashlib.sha256(raw).hexdigest()[:32],
    )


# ------------------------------------------------------------------ records


def _record(index: int, item: Json) -> Record:
    if not isinstance(item, dict):
        raise InvalidPayload("bad_record", f"records[{index}]: an object")
    seq = _integer(item, "seq")
    if seq < 1:
        raise InvalidPayload("bad_record", f"records[{index}].seq: 1 or more, not {seq}")
    kind = _field(item, "kind", str)
    if kind not in KINDS:
        raise InvalidPayload("bad_record", f"records[{index}].kind: one of {', '.join(KINDS)}, not {kind!r}")
    data = _field(item, "data", dict)
    record = Record(seq, _number(item, "ts"), kind, data)
    _check_kind(index, record)
    return record


def _check_kind(index: int, record: Record) -> None:
    """What the store acts on must be there: a drop's range, an event's name."""
    data = record.data
    if record.kind == "dropped":
        first, last = _integer(data, "from_seq"), _integer(data, "to_seq")
        if not 1 <= first <= last < record.seq:
            raise InvalidPayload(
                "bad_record",
                f"records[{index}]: dropped from_seq..to_seq must satisfy 1 <= from <= to < seq "
                f"({first}..{last}, seq {record.seq})",
            )
    elif record.kind == "event":
        _text(data, "event")
        if data["event"] == "update":
            _text(data, "state")
            _text(data, "target")
            _optional_text(data, "reason_code")


# ------------------------------------------------------------------ JSON with bounds


def _load(raw: bytes, limit: int) -> dict[str, Json]:
    if len(raw) > limit:
        raise InvalidPayload("too_large", f"{len(raw)} bytes; at most {limit}")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise InvalidPayload("not_utf8", "the payload is not UTF-8") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 4300-digit integer, deep nesting
        raise InvalidPayload("not_json", f"not JSON: {str(exc)[:120]}") from None
    _check_shape(doc)
    if not isinstance(doc, dict):
        raise InvalidPayload("not_object", "the payload is not a JSON object")
    return doc


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number in JSON")


def _check_shape(doc: Json) -> None:
    """Depth, count and number bounds, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Json, int]] = [(doc, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH or seen > MAX_VALUES:
            raise InvalidPayload("too_complex", f"nested deeper than {MAX_DEPTH} or over {MAX_VALUES} values")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise InvalidPayload("bad_number", "an integer beyond 64 bits")
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidPayload("bad_number", "a number too large for a double")


def _check_v_and_device(doc: Mapping[str, Json], device_field: str | None, topic_device: str) -> None:
    if doc.get("v") != 1 or isinstance(doc.get("v"), bool):
        raise InvalidPayload("bad_version", f"v: 1 expected, not {doc.get('v')!r}")
    if device_field is None:
        return
    claimed = _field(doc, device_field, str)
    if claimed != topic_device:
        raise InvalidPayload(
            "device_mismatch", f"{device_field} {claimed[:64]!r} is not the topic's device {topic_device!r}"
        )


def _field(doc: Mapping[str, Json], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidPayload("bad_field", f"{name}: {kind.__name__} expected, not {type(value).__name__}")
    if isinstance(value, str) and "\x00" in value:  # PostgreSQL text cannot hold NUL
        raise InvalidPayload("bad_field", f"{name}: a NUL character")
    return value


def _optional(doc: Mapping[str, Json], name: str, kind: type) -> Any:
    return None if doc.get(name) is None else _field(doc, name, kind)


def _text(doc: Mapping[str, Json], name: str) -> str:
    value: str = _field(doc, name, str)
    if not 1 <= len(value) <= 256:
        raise InvalidPayload("bad_field", f"{name}: 1 to 256 characters")
    return value


def _optional_text(doc: Mapping[str, Json], name: str) -> str | None:
    return None if doc.get(name) is None else _text(doc, name)


def _integer(doc: Mapping[str, Json], name: str) -> int:
    value: int = _field(doc, name, int)
    return value


def _number(doc: Mapping[str, Json], name: str) -> float:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidPayload("bad_field", f"{name}: a number expected, not {type(value).__name__}")
    return float(value)
