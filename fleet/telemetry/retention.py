"""Downsampling and retention: metrics records are rolled up by hour; raw ones go after ``raw_days``.

:func:`roll` folds the metrics records that ingest queued (table ``unrolled``) into the
hourly rollups (rollup.py) and dequeues them, in one transaction per chunk, under a lock
(PostgreSQL: an advisory lock; SQLite: the write lock), so service instances rolling at once
never count a record twice. The service rolls every minute; readers add the few records
still queued to the rollups, so nothing is missing in between.

:func:`prune` rolls first, records its cut-off (``retention_marks.raw_metrics_before``: from
then on finer series read the rollups before it), then deletes raw metrics records before
the cut-off (whole hours) that are rolled up, device by device in short transactions, and
rollups older than ``rollup_days``. Event and dropped records are kept (few, and they tell a
device's story). Safe to repeat and to run from any service instance, by cron or the API.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Connection, and_, delete, exists, select, text, update

from fleet.telemetry import rollup, schema
from fleet.telemetry.errors import TelemetryError
from fleet.telemetry.rollup import HOUR
from fleet.telemetry.store import TelemetryStore


class RetentionError(TelemetryError):
    code = "bad_retention"


_ROLL_LOCK_KEY = 0x7E1E_0E8  # PostgreSQL advisory lock: one roller at a time
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
    roll(store)
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
    """Only rolled-up records: one that arrived since the roll stays until the next prune."""
    r, u = schema.records.c, schema.unrolled.c
    queued = exists().where(u.device_id == r.device_id, u.seq == r.seq)
    with store.write() as conn:
        stmt = delete(schema.records).where(
            r.device_id == device, r.kind == "metrics", r.ts < cutoff, ~queued
        )
        return int(conn.execute(stmt).rowcount or 0)


def roll(store: TelemetryStore, chunk: int = 20_000) -> int:
    """Fold every queued metrics record into the rollups; returns how many were folded."""
    total = 0
    while True:
        with store.write() as conn:
            if store.is_postgresql:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ROLL_LOCK_KEY})
            done = _roll_chunk(conn, chunk)
        total += done
        if done < chunk:
            return total


def _roll_chunk(conn: Connection, chunk: int) -> int:
    u, r = schema.unrolled.c, schema.records.c
    query = (
        select(u.device_id, u.seq, r.ts, r.data)
        .join_from(schema.unrolled, schema.records, and_(r.device_id == u.device_id, r.seq == u.seq))
        .order_by(u.device_id, u.seq)
        .limit(chunk)
    )
    by_device: defaultdict[str, list[tuple[int, float, str]]] = defaultdict(list)
    for device, seq, ts, data in conn.execute(query).all():
        by_device[device].append((seq, ts, data))
    for device, items in by_device.items():
        rollup.merge(conn, device, rollup.fold((ts, json.loads(data)) for _, ts, data in items))
        seqs = [seq for seq, _, _ in items]
        for start in range(0, len(seqs), 500):  # bounded statement size (SQLite's variable limit)
            batch = seqs[start : start + 500]
            conn.execute(delete(schema.unrolled).where(u.device_id == device, u.seq.in_(batch)))
    return sum(len(items) for items in by_device.values())
