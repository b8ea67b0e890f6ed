"""Hourly rollups of metrics records: every numeric field, per device and hour, as count,
sum, min and max, so any of avg|max|min|sum can be asked of them later.

The store adds each new metrics record to its hour in the same transaction that inserts it
(only records that were really new: a redelivery adds nothing), so the rollups are always
complete: fleet-wide summaries and hour-step series read them instead of raw JSON, and
pruning raw records (retention.py) loses nothing but sub-hour detail.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func
from sqlalchemy.dialects import postgresql, sqlite

from fleet.telemetry import schema

HOUR = 3600
MAX_PATH_DEPTH = 6
MAX_METRICS_PER_RECORD = 500  # numeric fields rolled up per record; a flood of keys is cut here
METRIC = re.compile(r"[A-Za-z0-9_]{1,64}(\.[A-Za-z0-9_]{1,64}){0,5}")

Hours = dict[tuple[int, str], "Bucket"]  # (hour start, metric) -> bucket


@dataclass
class Bucket:
    """Running count, sum, min and max: what raw values and hourly rollups both reduce to."""

    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, count: int, total: float, low: float, high: float) -> None:
        self.count += count
        self.total += total
        self.low = min(self.low, low)
        self.high = max(self.high, high)

    def value(self, agg: str) -> float:
        if agg == "avg":
            return self.total / max(self.count, 1)
        return {"sum": self.total, "min": self.low, "max": self.high}[agg]


def numeric_leaves(data: Mapping[str, Any], prefix: str = "", depth: int = 1) -> Iterator[tuple[str, float]]:
    """Every number in a metrics record as (dotted path, value); booleans are not numbers."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            if METRIC.fullmatch(path):
                yield path, float(value)
        elif isinstance(value, dict) and depth < MAX_PATH_DEPTH:
            yield from numeric_leaves(value, path + ".", depth + 1)


def pick(data: Mapping[str, Any], path: str) -> float | None:
    value: Any = data
    for name in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def fold(records: Iterable[tuple[float, Mapping[str, Any]]], hours: Hours | None = None) -> Hours:
    """(ts, data) of metrics records -> their hourly buckets (added to ``hours`` if given)."""
    hours = defaultdict(Bucket) if hours is None else hours
    for ts, data in records:
        hour = int(ts // HOUR) * HOUR
        for i, (metric, value) in enumerate(numeric_leaves(data)):
            if i >= MAX_METRICS_PER_RECORD:
                break
            hours[(hour, metric)].add(1, value, value, value)
    return hours


def merge(conn: Connection, device: str, hours: Hours) -> None:
    """Upsert: an hour already there gains these counts (in the caller's transaction)."""
    rows = [
        {
            "device_id": device,
            "hour": h,
            "metric": m,
            "count": b.count,
            "sum": b.total,
            "min": b.low,
            "max": b.high,
        }
        for (h, m), b in sorted(hours.items())  # one order: concurrent writers lock rows alike
    ]
    if rows:  # executemany: one cached statement, sent as multi-row pages in this order
        conn.execute(_upsert(conn), rows)


def _upsert(conn: Connection) -> Any:
    table, pg = schema.metric_rollups, conn.dialect.name == "postgresql"
    stmt = (postgresql.insert if pg else sqlite.insert)(table)
    least, greatest = (func.least, func.greatest) if pg else (func.min, func.max)  # SQLite's min(a, b)
    new, old = stmt.excluded, table.c
    return stmt.on_conflict_do_update(
        index_elements=[old.device_id, old.hour, old.metric],
        set_={
            "count": old["count"] + new["count"],
            "sum": old["sum"] + new["sum"],
            "min": least(old["min"], new["min"]),
            "max": greatest(old["max"], new["max"]),
        },
    )
