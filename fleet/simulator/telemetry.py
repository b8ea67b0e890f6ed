"""A simulated device's telemetry: records numbered like the agent's spool, kept in memory
until the fleet acknowledges them, and plausible ``metrics`` figures.

The acknowledgement contract (docs/protocol.md, "Telemetry ack"): the fleet publishes,
retained, ``{root}/telemetry/ack`` with ``{"v": 1, "through_seq": N}`` once it has stored every
record up to N. The device keeps what is above the last ack (bounded like the agent's spool:
the oldest go, sent or not, and a ``dropped`` record names them) and sends it again on every
new connection and when no ack advanced for a while, so the fleet sees each record at least
once without the device having to know what the broker delivered.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BATCH_RECORDS = 50  # docs/protocol.md: 1 to 50 records a message
MAX_ACK_BYTES = 1024  # the agent's bound (agent/telemetry/ack.py); a real ack is ~30 bytes


class BadAck(ValueError):
    """A payload on the ack topic that is not an ack."""


def parse_ack(payload: bytes) -> int:
    """``through_seq`` of an ack, as strictly as the agent reads it: at most 1 KiB, a JSON
    object, ``v`` exactly the integer 1, ``through_seq`` a non-negative integer."""
    if len(payload) > MAX_ACK_BYTES:
        raise BadAck(f"{len(payload)} bytes, at most {MAX_ACK_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadAck("not UTF-8 JSON") from None
    if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != 1:
        raise BadAck("not a v1 ack")
    seq = doc.get("through_seq")
    if type(seq) is not int or seq < 0:  # type(): True and 1.0 are not integers here
        raise BadAck("through_seq must be a non-negative integer")
    return seq


@dataclass(frozen=True)
class Record:
    """One record, kept as the JSON it is sent as: a thousand devices each holding a backlog
    must not hold it as dictionaries, and a resend must not encode it again."""

    seq: int
    ts: float
    kind: str  # metrics, event or dropped
    raw: bytes  # {"seq", "ts", "kind", "data"} as JSON
    from_seq: int | None = None  # a dropped record's range start

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.raw)
        return doc


def encode_batch(device: str, records: list[Record]) -> bytes:
    head = json.dumps({"v": 1, "device": device}, separators=(",", ":"))[:-1].encode()
    return head + b',"records":[' + b",".join(r.raw for r in records) + b"]}"


class Outbox:
    """Records above the fleet's last ack, in seq order and contiguous (``records[0].seq``
    up to ``next_seq - 1``); at most ``max_records`` of them."""

    def __init__(self, max_records: int) -> None:
        self.max_records = max_records
        self.records: deque[Record] = deque()
        self.next_seq = 1
        self.acked = 0  # the fleet's last accepted through_seq
        self.sent_through = 0  # highest seq published on the current connection
        self.max_sent = 0  # highest seq ever published: an ack above it is refused
        self.dropped_total = 0
        self.progress_at = time.monotonic()  # when an ack last advanced (or the first send)

    def add(self, kind: str, data: Mapping[str, Any]) -> Record:
        """A new record; when the outbox is full the oldest tenth goes (at least room for the
        ``dropped`` record that names them and the new one)."""
        if len(self.records) >= self.max_records:
            self._drop_oldest(max(len(self.records) - self.max_records + 2, self.max_records // 10))
        return self._append(kind, data)

    def _append(self, kind: str, data: Mapping[str, Any], from_seq: int | None = None) -> Record:
        seq, ts = self.next_seq, round(time.time(), 3)
        raw = json.dumps({"seq": seq, "ts": ts, "kind": kind, "data": data}, separators=(",", ":"))
        record = Record(seq, ts, kind, raw.encode(), from_seq)
        self.next_seq += 1
        self.records.append(record)
        return record

    def _drop_oldest(self, count: int) -> None:
        gone = [self.records.popleft() for _ in range(min(count, len(self.records)))]
        first = min([gone[0].seq, *(r.from_seq for r in gone if r.from_seq is not None)])
        last = gone[-1].seq
        self.dropped_total += sum(1 for r in gone if r.kind != "dropped")  # each lost record once
        data = {"from_seq": first, "to_seq": last, "count": last - first + 1, "reason": "spool_full"}
        self._append("dropped", data, from_seq=first)

    def unsent(self) -> list[Record]:
        """The next batch to publish on this connection (records above ``sent_through``)."""
        if not self.records:
            return []
        start = max(0, self.sent_through + 1 - self.records[0].seq)
        return list(itertools.islice(self.records, start, start + BATCH_RECORDS))

    def mark_sent(self, through: int) -> None:
        if self.unacked() == 0:
            self.progress_at = time.monotonic()  # the ack timeout counts from the first unacked send
        self.sent_through = max(self.sent_through, through)
        self.max_sent = max(self.max_sent, through)

    def unacked(self) -> int:
        """Records sent and waiting for the fleet's ack."""
        if not self.records:
            return 0
        return max(0, min(self.max_sent, self.next_seq - 1) - self.records[0].seq + 1)

    def stalled(self, timeout_s: float) -> bool:
        """Records were sent but no ack advanced for ``timeout_s``: time to send them again."""
        return self.unacked() > 0 and time.monotonic() - self.progress_at >= timeout_s

    def rewind(self) -> int:
        """Everything above the last ack goes out again; returns how many were sent before."""
        again = self.unacked()
        self.sent_through = self.acked
        self.progress_at = time.monotonic()
        return again

    def ack(self, through_seq: int) -> str:
        """``accepted`` (records up to it are forgotten), ``ignored`` (not above the last ack:
        a retained ack seen again) or ``ahead`` (above anything sent: refused, nothing deleted)."""
        if through_seq <= self.acked:
            return "ignored"
        if through_seq > self.max_sent:
            return "ahead"
        self.forget(through_seq)
        return "accepted"

    def forget(self, through_seq: int) -> None:
        """Records up to ``through_seq`` are safe (the fleet's ack, or the broker's PUBACK in
        ``broker`` ack mode)."""
        self.acked = max(self.acked, through_seq)
        self.progress_at = time.monotonic()
        while self.records and self.records[0].seq <= through_seq:
            self.records.popleft()

    def stats(self) -> dict[str, Any]:
        """The ``spool`` figure of a metrics record."""
        oldest = self.records[0].ts if self.records else None
        return {
            "records": len(self.records),
            "unacked": self.unacked(),
            "oldest_ts": oldest,
            "dropped_total": self.dropped_total,
        }


@dataclass(frozen=True)
class Profile:
    """What a device's figures hover around: by hardware, varied per device."""

    tokens_per_s: float
    ttft_ms: float
    rss_mb: float
    cpu_temp_c: float
    disk_free_mb: float


def profile_for(rng: random.Random, hardware: tuple[str, ...]) -> Profile:
    arm = "aarch64" in hardware
    spread = rng.uniform(0.8, 1.2)
    return Profile(
        tokens_per_s=round((14.0 if arm else 38.0) * spread, 1),
        ttft_ms=round((620.0 if arm else 240.0) / spread, 1),
        rss_mb=round(rng.uniform(330, 420) if arm else rng.uniform(420, 520), 1),
        cpu_temp_c=round(rng.uniform(48, 62) if arm else rng.uniform(38, 50), 1),
        disk_free_mb=round(rng.uniform(4_000, 24_000), 1),
    )


@dataclass
class Interval:
    """Counts since the previous metrics record (the agent's interval counters)."""

    requests: Counter[tuple[str, str]]
    reconnects: int = 0
    reply_failures: int = 0

    @classmethod
    def fresh(cls) -> Interval:
        return cls(Counter())


def _pcts(rng: random.Random, p50: float) -> dict[str, float]:
    return {"p50": round(p50, 1), "p95": round(p50 * rng.uniform(1.3, 1.9), 1)}


def answers(rng: random.Random, profile: Profile, slowdown: float) -> dict[str, Any]:
    """``slowdown`` 1 is the device's own speed; 0.5 halves tokens/s and doubles the times."""
    count = rng.randint(1, 6)
    speed = profile.tokens_per_s * slowdown * rng.uniform(0.95, 1.05)
    ttft = profile.ttft_ms / slowdown * rng.uniform(0.9, 1.1)
    latency = ttft + 1000 * 48 / speed  # about 48 tokens an answer
    return {
        "count": count,
        "latency_ms": _pcts(rng, latency),
        "ttft_ms": _pcts(rng, ttft),
        "tokens_per_s_p50": round(speed, 1),
        "ungrounded": 1 if rng.random() < 0.05 else 0,
    }


def metrics(
    rng: random.Random,
    profile: Profile,
    *,
    pack: Mapping[str, str] | None,
    agent_version: str,
    uptime_s: float,
    slowdown: float,
    interval: Interval,
    spool: Mapping[str, Any],
) -> dict[str, Any]:
    """One ``metrics`` record's data, with every field docs/protocol.md lists."""
    answered = answers(rng, profile, slowdown)
    requests: dict[str, dict[str, int]] = {
        "query": {"ok": answered["count"]},
        "read": {"ok": rng.randint(0, 4)},
    }
    for (kind, outcome), n in interval.requests.items():
        requests.setdefault(kind, {})[outcome] = requests.get(kind, {}).get(outcome, 0) + n
    return {
        "pack": dict(pack) if pack else None,
        "agent_version": agent_version,
        "uptime_s": round(uptime_s, 1),
        "load1": round(rng.uniform(0.2, 1.8), 2),
        "cpu_temp_c": round(profile.cpu_temp_c + rng.uniform(-1.5, 1.5), 1),
        "rss_mb": round(profile.rss_mb + rng.uniform(-4, 4), 1),
        "disk_free_mb": profile.disk_free_mb,
        "queue_depth": rng.randint(0, 2),
        "requests": requests,
        "answers": answered,
        "reconnects": interval.reconnects,
        "reply_failures": interval.reply_failures,
        "spool": dict(spool),
    }
