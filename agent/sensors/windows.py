"""Rolling windows of readings per sensor, with bounded memory and honest staleness.

Ages are measured on the monotonic clock of the agent's receive time: a device without
a real-time clock must not see fresh readings turn stale when NTP moves the wall clock.
The wall-clock time is kept only to report ``ts``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from agent.config import SensorConfig

AGGREGATES = ("last", "mean", "min", "max", "count", "trend")


@dataclass(frozen=True)
class Reading:
    mono: float
    wall: float
    value: float


@dataclass(frozen=True)
class Fact:
    """One value as read, the way replies carry it (``facts`` entries)."""

    sensor: str
    value: float | None
    unit: str
    ts: float | None
    stale: bool
    agg: str
    window_s: float

    def to_json(self) -> dict[str, object]:
        return {
            "sensor": self.sensor,
            "value": self.value,
            "unit": self.unit,
            "ts": self.ts,
            "stale": self.stale,
            "agg": self.agg,
            "window": _window_text(self.window_s),
        }


def read_text(fact: Mapping[str, object], now: float | None = None) -> str:
    """A read for a person, from a fact as replies carry it (:meth:`Fact.to_json`): a trend
    in the sensor's unit per minute, a count in readings, and no reading said in words."""
    name, agg, window = fact.get("sensor"), fact.get("agg"), fact.get("window")
    value, unit = fact.get("value"), str(fact.get("unit") or "")
    where = f"{name} {agg} over {window}"
    if not isinstance(value, int | float) or isinstance(value, bool):
        if agg == "trend":
            return f"{where}: no trend, fewer than two readings in that time"
        return f"{name}: no reading in the last {window}"
    if agg == "count":
        shown = f"{value:.0f} reading{'' if value == 1 else 's'}"
    elif agg == "trend":
        shown = f"{value:+.3g} {unit} per minute".replace("  ", " ")
    else:
        shown = f"{value:.6g} {unit}".rstrip()
    return f"{where}: {shown}{_stale_text(fact, now)}"


def _stale_text(fact: Mapping[str, object], now: float | None) -> str:
    if not fact.get("stale"):
        return ""
    ts = fact.get("ts")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return " (stale)"
    age = (time.time() if now is None else now) - ts
    return f" (stale: the newest reading is {age_text(age)} old)"


def age_text(seconds: float) -> str:
    """A duration for a person: 45 s, 12 min, 3.5 h."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _window_text(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class SensorWindow:
    """Readings of one sensor for its window, at most ``max_points`` of them."""

    def __init__(
        self,
        cfg: SensorConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._clock, self._wall = clock, wall
        self._points: deque[Reading] = deque(maxlen=cfg.max_points)
        self._lock = threading.Lock()
        self.accepted = 0
        self.rejected = 0
        self.rejected_by_reason: Counter[str] = Counter()
        # the current run of refusals (reason, length): a sensor this board cannot read fails
        # every poll, and only the start of a run is worth a warning (the rest are counted)
        self.failing: tuple[str, int] | None = None

    def add(self, value: float, age_s: float = 0.0) -> None:
        """A reading measured ``age_s`` before now (a payload's own ``ts``); one older than
        the newest goes in its place in time, so ``last`` stays the newest measurement."""
        with self._lock:
            now = self._clock()
            point = Reading(now - age_s, self._wall() - age_s, value)
            if self._points and point.mono < self._points[-1].mono:
                ordered = sorted([*self._points, point], key=lambda p: p.mono)
                self._points = deque(ordered[-self.cfg.max_points :], maxlen=self.cfg.max_points)
            else:
                self._points.append(point)
            self.accepted += 1
            self.failing = None
            self._trim(now)

    def reject(self, reason: str) -> bool:
        """A reading refused: counted in total and by reason (``cmd status``). True when it
        starts a run of refusals (the first since a reading was accepted, or another reason
        than the run's): the caller warns then and only counts the rest of the run."""
        with self._lock:
            self.rejected += 1
            self.rejected_by_reason[reason] += 1
            first = self.failing is None or self.failing[0] != reason
            self.failing = (reason, 1 if first or self.failing is None else self.failing[1] + 1)
            return first

    def snapshot(self) -> list[tuple[float, float]]:
        """(wall time, value) of every reading in the window, oldest first, to save."""
        with self._lock:
            self._trim(self._clock())
            return [(p.wall, p.value) for p in self._points]

    def restore(self, points: list[tuple[float, float]]) -> None:
        """Readings saved by an earlier run. Their ages come from the wall clock (the
        monotonic clock restarts with the machine); a reading from the wall clock's future
        (the clock was set back) cannot be aged and is dropped, never taken as fresh."""
        now_mono, now_wall = self._clock(), self._wall()
        with self._lock:
            for wall, value in points:
                age = now_wall - wall
                if 0 <= age <= self.cfg.window_s:
                    self._points.append(Reading(now_mono - age, wall, value))
            self._trim(now_mono)

    def _trim(self, now: float) -> None:
        while self._points and now - self._points[0].mono > self.cfg.window_s:
            self._points.popleft()

    def age_s(self) -> float | None:
        with self._lock:
            return self._clock() - self._points[-1].mono if self._points else None

    def aggregate(self, agg: str, window_s: float | None = None) -> Fact:
        """Exact aggregate over the last ``window_s`` seconds (default: the sensor's window)."""
        span = min(window_s or self.cfg.window_s, self.cfg.window_s)
        now = self._clock()
        with self._lock:
            self._trim(now)
            pts = [p for p in self._points if now - p.mono <= span]
        last = pts[-1] if pts else None
        stale = last is None or now - last.mono > self.cfg.max_age_s
        return Fact(
            self.cfg.name, _compute(agg, pts), self.cfg.unit, last.wall if last else None, stale, agg, span
        )


def _compute(agg: str, pts: list[Reading]) -> float | None:
    if agg == "count":
        return float(len(pts))
    if not pts:
        return None
    values = [p.value for p in pts]
    if agg == "last":
        return values[-1]
    if agg == "mean":
        return float(np.mean(values))
    if agg == "min":
        return min(values)
    if agg == "max":
        return max(values)
    if agg == "trend":
        return _trend_per_min(pts)
    raise ValueError(f"unknown aggregate {agg!r}")


def _trend_per_min(pts: list[Reading]) -> float | None:
    """Least-squares slope in units per minute (None with fewer than two points)."""
    if len(pts) < 2:
        return None
    t = np.array([p.mono for p in pts]) - pts[0].mono
    if float(t[-1]) == 0.0:
        return None
    slope = np.polyfit(t, np.array([p.value for p in pts]), 1)[0]
    return float(slope * 60.0)
