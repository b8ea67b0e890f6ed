"""The schema, version by version: an ordered list of migrations applied when a store opens.

``schema_version`` holds one row per applied migration. Opening a store applies the missing
ones in order, in one transaction that holds the database's migration lock (PostgreSQL: an
advisory lock; SQLite: the write lock of BEGIN IMMEDIATE), so workers starting together
migrate once. A database newer than this code is refused rather than written to.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, text

from fleet.telemetry import schema
from fleet.telemetry.errors import StoreError

# An arbitrary constant: the key of the PostgreSQL advisory lock that serializes migrations.
_PG_LOCK_KEY = 0x7E1E_0E7


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


def _v1(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=list(schema.V1_TABLES))


def _v2(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=list(schema.V2_TABLES))
    # Series and summaries read metrics records by time. Plain DDL: an Index object would
    # attach itself to schema.records, and migration 1 would then create it as well.
    conn.exec_driver_sql("CREATE INDEX records_by_kind_time ON records (kind, ts)")
    # The records stored before: queued for the roller, as if they had just arrived.
    conn.exec_driver_sql(
        "INSERT INTO unrolled (device_id, seq) SELECT device_id, seq FROM records WHERE kind = 'metrics'"
    )


def _v3(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=list(schema.V3_TABLES))
    # The rollout driver reads a rollout's update events by its id (and its rollback's).
    conn.exec_driver_sql("CREATE INDEX update_events_by_rollout ON update_events (rollout_id, received_at)")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "devices, records, gaps, update events", _v1),
    Migration(2, "device labels (hardware, tags), hourly metric rollups, records by time", _v2),
    Migration(3, "rollouts, their waves and devices; update events by rollout", _v3),
)
LATEST = MIGRATIONS[-1].version


def migrate(conn: Connection) -> list[int]:
    """Bring the database to :data:`LATEST` inside the caller's transaction; returns the
    versions applied (empty when it was current)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    schema.metadata.create_all(conn, tables=[schema.schema_version])
    current = conn.execute(select(schema.schema_version.c.version)).scalars().all()
    newest = max(current, default=0)
    if newest > LATEST:
        raise StoreError(
            f"the telemetry database is at schema version {newest}, newer than this edge-fleet "
            f"knows ({LATEST}): upgrade edge-fleet"
        )
    applied = []
    for migration in MIGRATIONS:
        if migration.version in current:
            continue
        migration.apply(conn)
        conn.execute(
            insert(schema.schema_version).values(
                version=migration.version, name=migration.name, applied_at=time.time()
            )
        )
        applied.append(migration.version)
    return applied
