"""The telemetry thread: a ``metrics`` record into the spool every interval, and the spool
drained to ``{root}/telemetry`` in order, one batch at a time (docs/protocol.md, telemetry).

``telemetry.ack: fleet`` (the default): a batch the broker PUBACKed is *sent*, and its records
stay in the spool until the fleet's ingest worker says it stored them, on the retained topic
``{root}/telemetry/ack`` (:meth:`handle_ack`). Why: a broker's PUBACK is not delivery. Measured
with mosquitto 2.0.11: after a broker restart, messages it had acknowledged before the fleet's
shared subscription was back never reached the fleet, and stayed open gaps for good. So the
unacknowledged tail goes out again (:meth:`Spool.rewind`) on every new broker connection
(counted, so a quick reconnect is not missed) and when no ack advanced for
``telemetry.ack_timeout_s`` while records were out. Sending twice is harmless: the fleet
stores by (device, seq). ``telemetry.ack: broker``: deleted at the PUBACK (a device with no
fleet service to ack).

While the broker is away nothing is sent and records pile up in the spool (bounded there);
when it is back the backlog drains at ``drain_rate`` batches a second at most, so a device
that was offline for days does not crowd out its queries.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from agent.telemetry.ack import BadAck, parse_ack
from agent.telemetry.spool import ADVANCED, AHEAD, Spool

log = structlog.get_logger("edge_agent.telemetry")
BATCH_RECORDS = 50
BATCH_BYTES = 60_000  # under the documented 64 KiB with the envelope
# (topic, payload, seconds to wait for the PUBACK); raises when not acknowledged
Publish = Callable[[str, bytes, float], None]
ACK_MODES = ("fleet", "broker")


class TelemetryService:
    def __init__(
        self,
        spool: Spool,
        device_id: str,
        topic: str,
        collect: Callable[[], dict[str, Any]],
        publish: Publish,
        connected: Callable[[], bool],
        interval_s: float,
        drain_rate: float,
        *,
        connections: Callable[[], int] = lambda: 0,
        ack: str = "fleet",
        ack_timeout_s: float = 120.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``connections``: the transport's count of broker connections made (a change means
        a new one: send the unacknowledged tail again). ``monotonic``: the clock of the ack
        timeout (a test moves it by hand)."""
        if ack not in ACK_MODES:
            raise ValueError(f"telemetry ack {ack!r}: fleet or broker")
        self.spool, self.device_id, self.topic = spool, device_id, topic
        self.collect, self.publish, self.connected = collect, publish, connected
        self.interval_s, self.drain_rate = interval_s, drain_rate
        self.connections, self.ack_mode, self.ack_timeout_s = connections, ack, ack_timeout_s
        self.monotonic = monotonic
        self.acks: Counter[str] = Counter()  # what the fleet's acks did: advanced, stale, ahead, bad_*
        self.resends: Counter[str] = Counter()  # rewinds: reconnect, ack_timeout
        self._lock = threading.Lock()  # acks come on the dispatcher thread, sends on this one
        self._waiting_since: float | None = None  # when the oldest unanswered send went out
        self._seen_connections = 0

    def event(self, data: dict[str, Any]) -> None:
        """Spool an event record; a full disk is logged, never raised into the caller."""
        try:
            self.spool.append("event", data)
        except Exception as exc:
            log.warning("telemetry_event_lost", reason=repr(exc)[:200], event=str(data.get("event")))

    def record_metrics(self) -> None:
        try:
            self.spool.append("metrics", self.collect())
        except Exception as exc:
            log.warning("telemetry_metrics_lost", reason=repr(exc)[:200])

    def send_batch(self) -> int:
        """Publish the oldest unsent batch and wait for its PUBACK; returns the records sent.
        Raises (the transport's error) when the broker did not acknowledge it."""
        batch = self.spool.pending(BATCH_RECORDS, BATCH_BYTES)
        if not batch:
            return 0
        body = {"v": 1, "device": self.device_id, "records": [r.to_json() for r in batch]}
        fleet = self.ack_mode == "fleet"
        if fleet:
            self.spool.offer(batch[-1].seq)  # the fleet's ack may overtake the PUBACK
        self.publish(self.topic, json.dumps(body, separators=(",", ":")).encode(), 10.0)
        self.spool.mark_sent(batch[-1].seq, delete=not fleet)
        if fleet:
            with self._lock:
                if self._waiting_since is None:
                    self._waiting_since = self.monotonic()
        return len(batch)

    def handle_ack(self, payload: bytes) -> str:
        """A message on ``{root}/telemetry/ack`` (retained: one comes on every subscription).
        Returns what it did; a malformed or refused ack is logged and counted, never raised."""
        try:
            through = parse_ack(payload)
            outcome = self.spool.ack(through)
        except BadAck as exc:
            self._count_ack(exc.reason)
            log.warning("telemetry_ack_invalid", reason=exc.reason, error=str(exc))
            return exc.reason
        except Exception as exc:  # the spool's disk: the next ack (or a resend) tries again
            self._count_ack("failed")
            log.warning("telemetry_ack_failed", reason=repr(exc)[:200])
            return "failed"
        self._count_ack(outcome)
        if outcome == ADVANCED:
            with self._lock:
                self._waiting_since = self.monotonic() if self.spool.marks().outstanding else None
        elif outcome == AHEAD:
            log.warning(
                "telemetry_ack_refused",
                reason="ack_ahead",
                through_seq=through,
                sent_max=self.spool.marks().sent_max,
            )
        return outcome

    def resend_if_due(self) -> str | None:
        """Put the unacknowledged tail back in line when a new broker connection was made
        since the last look, or when no ack advanced for ``ack_timeout_s`` while records were
        out; returns why (``reconnect``, ``ack_timeout``) or None."""
        if self.ack_mode != "fleet":
            return None
        now = self.connections()
        why: str | None = None
        if now != self._seen_connections:
            self._seen_connections, why = now, "reconnect"
        elif self._ack_overdue():
            why = "ack_timeout"
        if why is None:
            return None
        again = self.spool.rewind()
        with self._lock:
            self._waiting_since = None  # the clock starts again with the first send
        self.resends[why] += 1
        if again:
            log.info(
                "telemetry_resend", reason=why, records=again, acked_through=self.spool.marks().acked_through
            )
        return why

    def _ack_overdue(self) -> bool:
        with self._lock:
            if not self.spool.marks().outstanding:
                self._waiting_since = None
                return False
            if self._waiting_since is None:
                self._waiting_since = self.monotonic()
            return self.monotonic() - self._waiting_since >= self.ack_timeout_s

    def _count_ack(self, outcome: str) -> None:
        with self._lock:
            self.acks[outcome] += 1

    def run(self, stopping: threading.Event) -> None:
        next_metrics = time.monotonic() + self.interval_s
        while not stopping.is_set():
            if time.monotonic() >= next_metrics:
                self.record_metrics()
                next_metrics += self.interval_s
            sent = 0
            if self.connected():
                try:
                    self.resend_if_due()
                    sent = self.send_batch()
                except Exception as exc:  # not acknowledged: the batch stays, tried again later
                    log.warning("telemetry_send_failed", reason=repr(exc)[:200])
                    stopping.wait(1.0)
                    continue
            stopping.wait(1.0 / self.drain_rate if sent else 0.2)
