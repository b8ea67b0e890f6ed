"""Retention with downsampling: raw metrics records become hourly rollups, then go.

Raw records are what a fleet looks at for the last days; months of them are too many rows.
``prune`` folds every numeric field of the metrics records older than the cut-off (whole
hours only) into ``metric_rollups`` (count, sum, min, max per device, hour and field, so any
of avg|max|min|sum can still be asked), then deletes those records, in one transaction per
device: a crash mid-way leaves each device either rolled up and pruned or untouched. Event
and dropped records are kept (they are few and tell a device's story); rollups older than
``rollup_days`` go too. A second prune merges into existing hours (a device that came back
after weeks offline delivers old records late), so it is safe to run any time, by cron or
through the API, from any service instance.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Connection, delete, func, select

from fleet.telemetry import schema
from fleet.telemetry.errors import TelemetryError
from fleet.telemetry.queries import HOUR, Bucket, numeric_leaves
from fleet.telemetry.store import TelemetryStore

MIN_RAW_DAYS = 1.0  # not below the broker session's expiry: a redelivered record must still be there
MAX_METRICS_PER_RECORD = 500  # numeric fields rolled up per record; a flood of keys is cut here


@dataclass(frozen=True)
class PruneResult:
    cutoff: float  # raw metrics records before this were rolled up and deleted
    records_pruned: int
    rollup_rows: int  # (device, hour, metric) rows written or merged
    rollups_deleted: int


def prune(
    store: TelemetryStore, raw_days: float, rollup_days: float = 400, now: float | None = None
) -> PruneResult:
    """Roll up and delete raw metrics older than ``raw_days`` (rounded down to an hour).

    At least :data:`MIN_RAW_DAYS`: a pruned record is no longer there to make its redelivery a
    duplicate, so it must be older than any redelivery the broker's session can still make."""
    if raw_days < MIN_RAW_DAYS:
        raise TelemetryError(f"raw_days: at least {MIN_RAW_DAYS} (the broker session's expiry)")
    now = time.time() if now is None else now
    cutoff = float(int((now - raw_days * 86_400) // HOUR) * HOUR)
    pruned = rows = 0
    for device in _devices_with_old_metrics(store, cutoff):
        with store.write() as conn:
            n, written = _fold_device(store, conn, device, cutoff)
        pruned, rows = pruned + n, rows + written
    with store.write() as conn:
        m = schema.metric_rollups.c
        gone = conn.execute(delete(schema.metric_rollups).where(m.hour < now - rollup_days * 86_400)).rowcount
    return PruneResult(cutoff, pruned, rows, int(gone or 0))


def _devices_with_old_metrics(store: TelemetryStore, cutoff: float) -> list[str]:
    r = schema.records.c
    query = select(r.device_id).where(r.kind == "metrics", r.ts < cutoff).group_by(r.device_id)
    with store.engine.connect() as conn:
        return list(conn.execute(query).scalars())


def _fold_device(store: TelemetryStore, conn: Connection, device: str, cutoff: float) -> tuple[int, int]:
    r = schema.records.c
    where = (r.device_id == device, r.kind == "metrics", r.ts < cutoff)
    hours: defaultdict[tuple[int, str], Bucket] = defaultdict(Bucket)
    count = 0
    for ts, data in conn.execute(select(r.ts, r.data).where(*where)).all():
        count += 1
        hour = int(ts // HOUR) * HOUR
        for i, (metric, value) in enumerate(numeric_leaves(json.loads(data))):
            if i >= MAX_METRICS_PER_RECORD:
                break
            hours[(hour, metric)].add(1, value, value, value)
    _merge(store, conn, device, hours)
    conn.execute(delete(schema.records).where(*where))
    return count, len(hours)


def _merge(
    store: TelemetryStore, conn: Connection, device: str, hours: dict[tuple[int, str], Bucket]
) -> None:
    """Upsert: an hour already rolled up gains the late records' counts."""
    if not hours:
        return
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
        for (h, m), b in hours.items()
    ]
    table = schema.metric_rollups
    least, greatest = (func.least, func.greatest) if store.is_postgresql else (func.min, func.max)
    for start in range(0, len(rows), 500):  # bounded statement size (SQLite's variable limit)
        stmt = store.insert_for(table).values(rows[start : start + 500])
        new, old = stmt.excluded, table.c
        stmt = stmt.on_conflict_do_update(
            index_elements=[old.device_id, old.hour, old.metric],
            set_={
                "count": old["count"] + new["count"],
                "sum": old["sum"] + new["sum"],
                "min": least(old["min"], new["min"]),
                "max": greatest(old["max"], new["max"]),
            },
        )
        conn.execute(stmt)
