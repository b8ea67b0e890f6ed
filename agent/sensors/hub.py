"""All sensors of the agent: windows by name, MQTT topic routing, pollers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import structlog

from agent.config import AgentConfig
from agent.errors import BadRequest, UnknownSensor
from agent.sensors.sources import BadReading, Poller, parse_payload, read_file, run_command
from agent.sensors.windows import AGGREGATES, Fact, SensorWindow
from model_packs.fileio import atomic_write_bytes

log = structlog.get_logger("edge_agent.sensors")


SAVE_EVERY_S = 10.0  # a kill or power cut loses at most this much of the windows


class SensorHub:
    def __init__(self, cfg: AgentConfig, save_to: Path | None = None) -> None:
        self.save_to = save_to  # where windows survive a restart (None: memory only)
        self.windows = {s.name: SensorWindow(s) for s in cfg.sensors}
        # a topic may feed several sensors (a Zigbee2MQTT device: temperature and humidity)
        self.topics: dict[str, list[str]] = {}
        for s in cfg.sensors:
            if s.source.type == "mqtt":
                self.topics.setdefault(s.source.topic or cfg.topic(f"sensors/{s.name}"), []).append(s.name)
        self.max_payload = cfg.limits.max_sensor_payload_bytes
        self._stop = threading.Event()
        self._pollers = [
            Poller(self.windows[s.name], read_file if s.source.type == "file" else run_command, self._stop)
            for s in cfg.sensors
            if s.source.type in ("file", "command")
        ]

    def start(self) -> None:
        if self.save_to is not None:
            self.load(self.save_to)
            threading.Thread(target=self._save_loop, name="sensor-save", daemon=True).start()
        for p in self._pollers:
            p.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.save_to is not None:
            self.save(self.save_to)

    def _save_loop(self) -> None:
        assert self.save_to is not None
        saved = self._accepted()
        while not self._stop.wait(SAVE_EVERY_S):
            if self._accepted() != saved:
                saved = self._accepted()
                try:
                    self.save(self.save_to)
                except OSError as exc:  # a full disk must not stop the agent
                    log.warning("sensor_windows_not_saved", reason=str(exc))

    def _accepted(self) -> int:
        return sum(w.accepted for w in self.windows.values())

    def ingest(self, topic: str, payload: bytes) -> bool:
        """Feed an MQTT reading to every sensor on its topic; False if it is no sensor topic."""
        names = self.topics.get(topic)
        if names is None:
            return False
        for name in names:
            self._ingest_one(self.windows[name], payload)
        return True

    def _ingest_one(self, window: SensorWindow, payload: bytes) -> None:
        name = window.cfg.name
        try:
            if len(payload) > self.max_payload:
                raise BadReading(f"payload of {len(payload)} bytes is over {self.max_payload}", "too_large")
            reading = parse_payload(payload, window.cfg)
            window.add(reading.value, reading.age_s)
        except BadReading as exc:  # warned at the start of a run of refusals, then only counted
            level = log.warning if window.reject(exc.reason) else log.debug
            level("bad_reading", sensor=name, reason=exc.reason, error=str(exc)[:200])

    def read(self, sensor: str, agg: str, window_s: float | None) -> Fact:
        if sensor not in self.windows:
            known = ", ".join(sorted(self.windows)) or "none"
            raise UnknownSensor(f"no sensor named {sensor!r} (known: {known})")
        if agg not in AGGREGATES:
            raise BadRequest(f"agg must be one of {', '.join(AGGREGATES)}, got {agg!r}")
        return self.windows[sensor].aggregate(agg, window_s)

    def save(self, path: Path) -> None:
        """Write every window's readings (atomically): the next start serves them at once."""
        data = {name: w.snapshot() for name, w in self.windows.items()}
        atomic_write_bytes(path, json.dumps({"v": 1, "windows": data}).encode())

    def load(self, path: Path) -> None:
        """Readings an earlier run saved; a missing or damaged file just means none."""
        try:
            data = json.loads(path.read_bytes())["windows"]
            for name, points in data.items():
                if name in self.windows:
                    self.windows[name].restore([(float(w), float(v)) for w, v in points])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("sensor_windows_unreadable", path=str(path), reason=str(exc)[:200])

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
                    "rejected_by_reason": dict(w.rejected_by_reason),
                }
            )
        return out
