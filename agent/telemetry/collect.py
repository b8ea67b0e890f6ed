"""What a ``metrics`` record holds (docs/protocol.md, telemetry): the interval's counters and a
reading of the machine. Reading only: nothing here writes or sends."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.telemetry.metrics import Metrics

THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")


def _cpu_temp_c(path: Path = THERMAL) -> float | None:
    try:
        return round(int(path.read_text().strip()) / 1000, 1)
    except (OSError, ValueError):
        return None  # no thermal zone (containers, some x86 boards)


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def system_figures(state_dir: Path) -> dict[str, Any]:
    """Load, temperature, this process's RSS and the free disk where the state lives."""
    try:
        load1: float | None = round(os.getloadavg()[0], 2)
    except OSError:
        load1 = None
    try:
        free_mb = round(shutil.disk_usage(state_dir).free / 2**20, 1)
    except OSError:
        free_mb = 0.0
    return {"load1": load1, "cpu_temp_c": _cpu_temp_c(), "rss_mb": _rss_mb(), "disk_free_mb": free_mb}


@dataclass
class Collector:
    """Builds one ``metrics`` record; counters that only grow elsewhere are turned into the
    interval's increase here."""

    metrics: Metrics
    agent_version: str
    state_dir: Path
    pack: Callable[[], dict[str, str] | None]
    queue_depth: Callable[[], int]
    connects: Callable[[], int]
    reply_failures: Callable[[], int]
    spool_stats: Callable[[], dict[str, Any]]
    started: float = field(default_factory=time.monotonic)
    _last: dict[str, int] = field(default_factory=dict)

    def _delta(self, name: str, now: int, first: int = 0) -> int:
        before = self._last.get(name, first)
        self._last[name] = now
        return max(0, now - before)

    def __call__(self) -> dict[str, Any]:
        return {
            "pack": self.pack(),
            "agent_version": self.agent_version,
            "uptime_s": round(time.monotonic() - self.started, 1),
            **system_figures(self.state_dir),
            "queue_depth": self.queue_depth(),
            **self.metrics.take(),
            "reconnects": self._delta("connects", self.connects(), first=1),  # the first connect is not one
            "reply_failures": self._delta("reply_failures", self.reply_failures()),
            "spool": self.spool_stats(),
        }
