"""Where readings come from: MQTT topics, files/sysfs, commands. Bad readings are counted.

A source only produces numbers; the hub owns the windows. Pollers run in daemon threads
and never raise out of their loop: a broken sensor is logged and counted, the agent goes on.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
from collections.abc import Callable

import structlog

from agent.config import SensorConfig
from agent.sensors.windows import SensorWindow

log = structlog.get_logger("edge_agent.sensors")


class BadReading(ValueError):
    """A payload or output that is not a finite number."""


def parse_payload(payload: bytes) -> float:
    """A bare number or ``{"value": n, "unit"?, "ts"?}``; anything else is a BadReading."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSON, int over 4300 digits
        raise BadReading(f"not a number or JSON object: {payload[:40]!r}") from None
    if isinstance(data, dict):
        data = data.get("value")
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise BadReading(f"reading has no numeric value: {payload[:40]!r}")
    try:
        return _finite(float(data))
    except OverflowError:  # an integer too large for a float
        raise BadReading(f"reading is out of range: {payload[:40]!r}") from None


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise BadReading(f"reading {value} is not finite")
    return value


def parse_text(text: str, scale: float) -> float:
    try:
        return _finite(float(text.strip().split()[0]) * scale)
    except (ValueError, IndexError):
        raise BadReading(f"output is not a number: {text[:40]!r}") from None


def read_file(cfg: SensorConfig) -> float:
    assert cfg.source.path is not None
    with open(cfg.source.path, encoding="utf-8") as fh:
        return parse_text(fh.read(64), cfg.source.scale)


def run_command(cfg: SensorConfig) -> float:
    done = subprocess.run(
        list(cfg.source.argv), capture_output=True, text=True, timeout=cfg.source.timeout_s, check=False
    )
    if done.returncode != 0:
        raise BadReading(f"command exited {done.returncode}: {done.stderr.strip()[:80]}")
    return parse_text(done.stdout, cfg.source.scale)


class Poller:
    """Calls ``read`` every ``interval_s`` and feeds the window until stopped."""

    def __init__(self, window: SensorWindow, read: Callable[[SensorConfig], float], stop: threading.Event):
        self.window, self.read, self.stop = window, read, stop
        self.thread = threading.Thread(target=self._loop, name=f"sensor-{window.cfg.name}", daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.window.add(self.read(self.window.cfg))
            except (OSError, BadReading, subprocess.TimeoutExpired) as exc:
                self.window.rejected += 1
                log.warning("bad_reading", sensor=self.window.cfg.name, reason=str(exc))
            self.stop.wait(self.window.cfg.source.interval_s)
