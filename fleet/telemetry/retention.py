"""Retention: raw metrics records go after ``raw_days``; their hourly rollups stay for months.

Raw records are what a fleet looks at for the last days; months of them are too many rows.
The store keeps hourly rollups of every metrics record as it arrives (rollup.py), so pruning
is only deletes: raw metrics records before the cut-off (whole hours), device by device in
short transactions, then rollups older than ``rollup_days``. The cut-off is recorded first
(``retention_marks.raw_metrics_before``), so from then on series read the rollups for that
range, whether or not the deletes are done. Event and dropped records are kept (few, and they
tell a device's story). Safe to repeat and to run from any service instance, by cron or
through the API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from fleet.telemetry import schema
from fleet.telemetry.errors import TelemetryError
from fleet.telemetry.rollup import HOUR
from fleet.telemetry.store import TelemetryStore


class RetentionError(TelemetryError):
    code = "bad_retention"


MIN_RAW_DAYS = 1.0  # not below the broker session's expiry: a redelivered record must still be there


@dataclass(frozen=True)
class PruneResult:
    cutoff: float  # raw metrics records before this were deleted
    records_pruned: int
    rollups_deleted: int


def prune(
    store: TelemetryStore, raw_days: float, rollup_days: float = 400, now: float | None = None
) -> PruneResult:
    """Delete raw metrics older than ``raw_days`` (rounded down to an hour) and rollups older
    than ``rollup_days``. At least :data:`MIN_RAW_DAYS`: a pruned record is no longer there
    to make its redelivery a duplicate, so it must be older than any redelivery the broker's
    session can still make."""
    if raw_days < MIN_RAW_DAYS or rollup_days < raw_days:
        raise RetentionError(f"raw_days: at least {MIN_RAW_DAYS}, and rollup_days at least raw_days")
    now = time.time() if now is None else now
    cutoff = float(int((now - raw_days * 86_400) // HOUR) * HOUR)
    _raise_mark(store, cutoff)
    pruned = sum(_prune_device(store, device, cutoff) for device in _devices_with_old_metrics(store, cutoff))
    m = schema.metric_rollups.c
    with store.write() as conn:
        gone = conn.execute(delete(schema.metric_rollups).where(m.hour < now - rollup_days * 86_400)).rowcount
    return PruneResult(cutoff, pruned, int(gone or 0))


def _raise_mark(store: TelemetryStore, cutoff: float) -> None:
    """The mark only moves forward (a prune with a longer raw_days deletes nothing new)."""
    k = schema.retention_marks.c
    stmt = store.insert_for(schema.retention_marks).values(name=schema.RAW_MARK, value=cutoff)
    with store.write() as conn:
        conn.execute(stmt.on_conflict_do_nothing())
        conn.execute(
            update(schema.retention_marks)
            .where(k.name == schema.RAW_MARK, k.value < cutoff)
            .values(value=cutoff)
        )


def _devices_with_old_metrics(store: TelemetryStore, cutoff: float) -> list[str]:
    r = schema.records.c
    query = select(r.device_id).where(r.kind == "metrics", r.ts < cutoff).group_by(r.device_id)
    with store.engine.connect() as conn:
        return list(conn.execute(query).scalars())


def _prune_device(store: TelemetryStore, device: str, cutoff: float) -> int:
    r = schema.records.c
    with store.write() as conn:
        result = conn.execute(
            delete(schema.records).where(r.device_id == device, r.kind == "metrics", r.ts < cutoff)
        )
        return int(result.rowcount or 0)
