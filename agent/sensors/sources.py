"""Where readings come from: MQTT topics, files/sysfs, commands. Bad readings are counted.

A source only produces numbers; the hub owns the windows. Pollers run in daemon threads
and never raise out of their loop: a broken sensor is logged and counted, the agent goes on.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from agent import units
from agent.config import SensorConfig, SourceConfig
from agent.sensors import extract
from agent.sensors.windows import SensorWindow

log = structlog.get_logger("edge_agent.sensors")


class BadReading(ValueError):
    """A payload or output that is not a usable reading; ``reason`` is a short stable code
    (``not_a_number``, ``out_of_range``, ``unit``, ``ts``) counted per sensor."""

    def __init__(self, message: str, reason: str = "not_a_number") -> None:
        super().__init__(message)
        self.reason = reason


# A payload's own ts is honoured only this far ahead of the agent's clock (a sensor's clock a
# little fast); further, or older than the sensor's window, the reading is refused, never
# stored at a time the agent cannot place.
MAX_FUTURE_S = 5.0


@dataclass(frozen=True)
class Payload:
    value: float  # in the sensor's configured unit
    age_s: float  # how long before receipt it was measured (0 without a ts)


def parse_payload(payload: bytes, cfg: SensorConfig, now: float | None = None) -> Payload:
    """A bare number or ``{"value": n, "unit"?, "ts"?}``; anything else is a BadReading.

    ``unit``: converted into the sensor's (``{"value": 99.9, "unit": "lb"}`` for a sensor in
    kg is stored as 45.3); a unit that is unknown or not convertible refuses the reading
    (``unit``). ``ts`` (Unix seconds): the reading's own time, within the sensor's window and
    at most MAX_FUTURE_S ahead of ``now`` (``ts`` otherwise)."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSON, int over 4300 digits
        raise BadReading(f"not a number or JSON object: {payload[:40]!r}") from None
    unit: object = None
    ts: object = None
    if cfg.source.json_path is not None:  # Zigbee2MQTT, Tasmota: one field of a larger object
        try:
            data = extract.pick(data, cfg.source.json_path)
        except extract.NoNumber as exc:
            raise BadReading(str(exc), exc.reason) from None
    if isinstance(data, dict):
        unit, ts, data = data.get("unit"), data.get("ts"), data.get("value")
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise BadReading(f"reading has no numeric value: {payload[:40]!r}")
    try:
        value = _finite(float(data))
    except OverflowError:  # an integer too large for a float
        raise BadReading(f"reading is out of range: {payload[:40]!r}", "out_of_range") from None
    return Payload(_in_unit(value, unit, cfg), _age(ts, cfg, time.time() if now is None else now))


def _in_unit(value: float, unit: object, cfg: SensorConfig) -> float:
    if unit is None:
        return value
    if not isinstance(unit, str) or len(unit) > 32:
        raise BadReading(f"unit must be a short string, got {str(unit)[:40]!r}", "unit")
    try:
        return _finite(units.convert_reading(value, unit, cfg.unit))
    except units.UnitError as exc:
        raise BadReading(f"{cfg.name}: {exc}", "unit") from None


def _age(ts: object, cfg: SensorConfig, now: float) -> float:
    if ts is None:
        return 0.0
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise BadReading(f"ts must be Unix seconds, got {str(ts)[:40]!r}", "ts")
    age = now - float(ts)
    if age < -MAX_FUTURE_S or age > cfg.window_s:
        where = "ahead of" if age < 0 else "older than the window before"
        raise BadReading(f"ts {ts} is {abs(age):.0f} s {where} the agent's clock", "ts")
    return max(age, 0.0)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise BadReading(f"reading {value} is not finite")
    return value


def parse_text(text: str, src: SourceConfig) -> float:
    """The number in a file's or command's text (extract.text_number), times ``scale``."""
    try:
        value = extract.text_number(text, src.pattern, src.json_path)
    except extract.NoNumber as exc:
        raise BadReading(str(exc), exc.reason) from None
    return _finite(value * src.scale)


def read_file(cfg: SensorConfig) -> float:
    assert cfg.source.path is not None
    with open(cfg.source.path, encoding="utf-8") as fh:
        return parse_text(fh.read(extract.MAX_TEXT), cfg.source)


def run_command(cfg: SensorConfig) -> float:
    done = subprocess.run(
        list(cfg.source.argv), capture_output=True, text=True, timeout=cfg.source.timeout_s, check=False
    )
    if done.returncode != 0:
        raise BadReading(f"command exited {done.returncode}: {done.stderr.strip()[:80]}")
    return parse_text(done.stdout, cfg.source)


class Poller:
    """Calls ``read`` every ``interval_s`` and feeds the window until stopped."""

    def __init__(self, window: SensorWindow, read: Callable[[SensorConfig], float], stop: threading.Event):
        self.window, self.read, self.stop = window, read, stop
        self.thread = threading.Thread(target=self._loop, name=f"sensor-{window.cfg.name}", daemon=True)

    def _loop(self) -> None:
        name = self.window.cfg.name
        while not self.stop.is_set():
            try:
                value = self.read(self.window.cfg)
            except (OSError, BadReading, subprocess.TimeoutExpired) as exc:
                reason = exc.reason if isinstance(exc, BadReading) else "source"
                if self.window.reject(reason):  # the sample's cpu_temp off a Pi fails every poll
                    log.warning("bad_reading", sensor=name, reason=str(exc), then="counted in cmd status")
                else:
                    log.debug("bad_reading", sensor=name, reason=str(exc))
            else:
                failed = self.window.failing
                self.window.add(value)
                if failed is not None:
                    log.info("sensor_reading_again", sensor=name, after_failures=failed[1])
            self.stop.wait(self.window.cfg.source.interval_s)
