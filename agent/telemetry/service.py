"""The telemetry thread: a ``metrics`` record into the spool every interval, and the spool
drained to ``{root}/telemetry`` in order, one batch at a time, each deleted only after the
broker's PUBACK (docs/protocol.md, telemetry).

While the broker is away nothing is sent and records pile up in the spool (bounded there);
when it is back the backlog drains at ``drain_rate`` batches a second at most, so a device
that was offline for days does not crowd out its queries.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.telemetry.spool import Spool

log = structlog.get_logger("edge_agent.telemetry")
BATCH_RECORDS = 50
BATCH_BYTES = 60_000  # under the documented 64 KiB with the envelope
# (topic, payload, seconds to wait for the PUBACK); raises when not acknowledged
Publish = Callable[[str, bytes, float], None]


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
    ) -> None:
        self.spool, self.device_id, self.topic = spool, device_id, topic
        self.collect, self.publish, self.connected = collect, publish, connected
        self.interval_s, self.drain_rate = interval_s, drain_rate

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
        """Publish the oldest pending batch and wait for its PUBACK; returns the records sent.
        Raises (the transport's error) when the broker did not acknowledge it."""
        batch = self.spool.pending(BATCH_RECORDS, BATCH_BYTES)
        if not batch:
            return 0
        body = {"v": 1, "device": self.device_id, "records": [r.to_json() for r in batch]}
        self.publish(self.topic, json.dumps(body, separators=(",", ":")).encode(), 10.0)
        self.spool.ack(batch[-1].seq)
        return len(batch)

    def run(self, stopping: threading.Event) -> None:
        next_metrics = time.monotonic() + self.interval_s
        while not stopping.is_set():
            if time.monotonic() >= next_metrics:
                self.record_metrics()
                next_metrics += self.interval_s
            sent = 0
            if self.connected():
                try:
                    sent = self.send_batch()
                except Exception as exc:  # not acknowledged: the batch stays, tried again later
                    log.warning("telemetry_send_failed", reason=repr(exc)[:200])
                    stopping.wait(1.0)
                    continue
            stopping.wait(1.0 / self.drain_rate if sent else 0.2)
