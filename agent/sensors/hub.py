"""All sensors of the agent: windows by name, MQTT topic routing, pollers."""

from __future__ import annotations

import threading

import structlog

from agent.config import AgentConfig
from agent.errors import BadRequest, UnknownSensor
from agent.sensors.sources import BadReading, Poller, parse_payload, read_file, run_command
from agent.sensors.windows import AGGREGATES, Fact, SensorWindow

log = structlog.get_logger("edge_agent.sensors")


class SensorHub:
    def __init__(self, cfg: AgentConfig) -> None:
        self.windows = {s.name: SensorWindow(s) for s in cfg.sensors}
        self.topics = {
            (s.source.topic or cfg.topic(f"sensors/{s.name}")): s.name
            for s in cfg.sensors
            if s.source.type == "mqtt"
        }
        self.max_payload = cfg.limits.max_sensor_payload_bytes
        self._stop = threading.Event()
        self._pollers = [
            Poller(self.windows[s.name], read_file if s.source.type == "file" else run_command, self._stop)
            for s in cfg.sensors
            if s.source.type in ("file", "command")
        ]

    def start(self) -> None:
        for p in self._pollers:
            p.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def ingest(self, topic: str, payload: bytes) -> bool:
        """Feed an MQTT reading; returns False if the topic is not a sensor topic."""
        name = self.topics.get(topic)
        if name is None:
            return False
        window = self.windows[name]
        try:
            if len(payload) > self.max_payload:
                raise BadReading(f"payload of {len(payload)} bytes is over {self.max_payload}")
            window.add(parse_payload(payload))
        except BadReading as exc:
            window.rejected += 1
            log.warning("bad_reading", sensor=name, reason=str(exc))
        return True

    def read(self, sensor: str, agg: str, window_s: float | None) -> Fact:
        if sensor not in self.windows:
            known = ", ".join(sorted(self.windows)) or "none"
            raise UnknownSensor(f"no sensor named {sensor!r} (known: {known})")
        if agg not in AGGREGATES:
            raise BadRequest(f"agg must be one of {', '.join(AGGREGATES)}, got {agg!r}")
        return self.windows[sensor].aggregate(agg, window_s)

    def summary(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for name, w in sorted(self.windows.items()):
            age = w.age_s()
            out.append(
                {
                    "sensor": name,
                    "age_s": None if age is None else round(age, 1),
                    "stale": age is None or age > w.cfg.max_age_s,
                    "accepted": w.accepted,
                    "rejected": w.rejected,
                }
            )
        return out
