"""TelemetryStore: the fleet's telemetry in SQLite (default, no set-up) or PostgreSQL.

One data layer over SQLAlchemy Core for both: the statements are the same, only the
dialect's INSERT (for ON CONFLICT) and the connection set-up differ. Every write is one
transaction that is safe to repeat, because an MQTT worker repeats it: a message it stored
but could not acknowledge comes back after a restart. Records are keyed by (device, seq) and
inserted with ON CONFLICT DO NOTHING, so a redelivery inserts nothing and is counted as a
duplicate; the gaps (and the queue of records for the hourly rollups, rollup.py) move by the
records that were really new.

Several workers may write at once (shared subscriptions). Per device, a batch's transaction
first upserts the device's registry row, which on PostgreSQL locks it until commit, so the
gap arithmetic of two batches of one device never interleaves; SQLite serializes all
writers with BEGIN IMMEDIATE.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    URL,
    Connection,
    Engine,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry

from fleet.telemetry import gaps as gap_math
from fleet.telemetry import migrations, schema
from fleet.telemetry.errors import StoreError
from fleet.telemetry.payloads import Batch, Record, StatusDoc, UpdateStatus

DEFAULT_SQLITE = "fleet-telemetry.sqlite3"
_WRITE = "edge_fleet_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)


@dataclass(frozen=True)
class BatchResult:
    stored: int
    duplicates: int
    lags_s: tuple[float, ...]  # received_at - ts of each stored record


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    first_seen: float
    last_seen: float
    max_seq: int
    state: str | None
    online: bool | None
    status_ts: float | None
    pack_name: str | None
    pack_version: str | None
    agent_version: str | None
    updated_at: float | None


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    ts: float
    kind: str
    data: dict[str, Any]
    received_at: float


@dataclass(frozen=True)
class StoredGap:
    from_seq: int
    to_seq: int
    state: str
    detected_at: float


@dataclass(frozen=True)
class UpdateEvent:
    source: str  # "telemetry" or "update_status"
    seq: int
    rollout_id: str | None
    target: str
    state: str
    percent: float | None
    reason_code: str | None
    reason: str | None
    ts: float
    received_at: float


def database_url(where: str) -> URL:
    """A path means an SQLite file; ``postgresql://`` gets the installed driver (psycopg 3)."""
    if "://" not in where:
        return URL.create("sqlite", database=str(Path(where).expanduser().resolve()))
    try:
        url = make_url(where)
    except ArgumentError as exc:
        raise StoreError(f"not a database URL: {exc}") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"{url.get_backend_name()!r}: the telemetry store runs on sqlite or postgresql")
    return url


class TelemetryStore:
    """Open with :meth:`open`; thread-safe (a connection pool); :meth:`close` when done."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{_WRITE: True})
        self._pg = engine.dialect.name == "postgresql"

    @classmethod
    def open(cls, where: str = DEFAULT_SQLITE, *, busy_timeout_s: float = 30.0) -> TelemetryStore:
        """Connect and migrate. ``busy_timeout_s``: how long an SQLite writer waits for
        another process's write lock before the write fails (and the worker retries)."""
        url = database_url(where)
        if url.get_backend_name() == "sqlite":
            engine = _sqlite_engine(url, busy_timeout_s)
        else:
            engine = create_engine(url, pool_pre_ping=True)  # survives a database restart
        store = cls(engine)
        try:
            with store._writer.begin() as conn:
                migrations.migrate(conn)
        except (OperationalError, InterfaceError) as exc:
            engine.dispose()
            where_safe = url.render_as_string(hide_password=True)
            raise StoreError(f"cannot open the telemetry database {where_safe}: {exc.orig or exc}") from None
        return store

    def close(self) -> None:
        self.engine.dispose()

    def write(self) -> Any:
        """A write transaction (SQLite: BEGIN IMMEDIATE), for modules beside the store (retention)."""
        return self._writer.begin()

    @property
    def is_postgresql(self) -> bool:
        return self._pg

    def insert_for(self, table: Any) -> postgresql.Insert | sqlite.Insert:
        """The dialect's INSERT, which has ON CONFLICT."""
        return self._insert(table)

    # ------------------------------------------------------------------ writes

    def ingest(self, batch: Batch, received_at: float) -> BatchResult:
        """Store one telemetry message; only its new records count and move the gaps."""
        return self.ingest_many([(batch, received_at)])[0]

    def ingest_many(self, messages: Sequence[tuple[Batch, float]]) -> list[BatchResult]:
        """Store several telemetry messages (each with its receive time) in one transaction,
        with the same outcome as storing them one by one in this order: one result per
        message, where a (device, seq) that an earlier message of the list carried counts as
        a duplicate. A few statements for the whole list (executemany) instead of five per
        message: the ingest worker's throughput."""
        if not messages:
            return []
        seen: set[tuple[str, int]] = set()
        rows: list[dict[str, Any]] = []
        first_time: dict[str, float] = {}
        last_time: dict[str, float] = {}
        for batch, received_at in messages:
            dev = batch.device
            first_time[dev] = min(first_time.get(dev, received_at), received_at)
            last_time[dev] = max(last_time.get(dev, received_at), received_at)
            for r in batch.records:
                if (dev, r.seq) not in seen:
                    seen.add((dev, r.seq))
                    rows.append(
                        {
                            "device_id": dev,
                            "seq": r.seq,
                            "ts": r.ts,
                            "kind": r.kind,
                            "data": r.data_json,
                            "received_at": received_at,
                        }
                    )
        with self._writer.begin() as conn:
            prev_max = self._touch_devices(conn, last_time)
            stored = self._insert_record_rows(conn, rows)
            results: list[BatchResult] = []
            new_by_device: dict[str, list[Record]] = {}
            updates: list[dict[str, Any]] = []
            unrolled: list[dict[str, Any]] = []
            for batch, received_at in messages:
                dev = batch.device
                new = []
                for r in batch.records:
                    if (dev, r.seq) in stored:
                        stored.discard((dev, r.seq))  # a later copy in this list is a duplicate
                        new.append(r)
                new_by_device.setdefault(dev, []).extend(new)
                updates += self._telemetry_update_rows(dev, new, received_at)
                unrolled += [{"device_id": dev, "seq": r.seq} for r in new if r.kind == "metrics"]
                lags = tuple(received_at - r.ts for r in new)
                results.append(BatchResult(len(new), len(batch.records) - len(new), lags))
            if updates:
                conn.execute(self._insert(schema.update_events).on_conflict_do_nothing(), updates)
            if unrolled:
                conn.execute(self._insert(schema.unrolled).on_conflict_do_nothing(), unrolled)
            maxima: list[dict[str, Any]] = []
            for dev, new in new_by_device.items():
                new_max = self._advance_gaps(conn, dev, prev_max[dev], new, first_time[dev])
                if new_max > prev_max[dev]:
                    maxima.append({"d": dev, "m": new_max})
            if maxima:
                by_device = schema.devices.c.device_id == bindparam("d")
                conn.execute(update(schema.devices).where(by_device).values(max_seq=bindparam("m")), maxima)
        return results

    def apply_status(self, doc: StatusDoc, received_at: float) -> bool:
        """Record a status document in the registry (see :meth:`_apply_status`)."""
        with self._writer.begin() as conn:
            return self._apply_status(conn, doc, received_at)

    def add_update_status(self, ev: UpdateStatus, received_at: float) -> bool:
        """Store one live update event; False for a redelivery of one already stored."""
        with self._writer.begin() as conn:
            return self._add_update_status(conn, ev, received_at)

    def record_many(self, messages: Sequence[tuple[StatusDoc | UpdateStatus, float]]) -> list[bool]:
        """Status documents and update events (each with its receive time) in one
        transaction, in order: the same outcome as one by one, with one commit (one fsync)
        for all. A rollout's wave makes a burst of them (about eight events and a status
        per device): one by one, 1,000 devices' burst outran the worker and the broker
        dropped what its queue could not hold (bench/rollout.py)."""
        with self._writer.begin() as conn:
            return [
                self._apply_status(conn, m, at)
                if isinstance(m, StatusDoc)
                else self._add_update_status(conn, m, at)
                for m, at in messages
            ]

    def _apply_status(self, conn: Connection, doc: StatusDoc, received_at: float) -> bool:
        """Record a status document in the registry; returns False when a later-received
        one is already there. Order is by the fleet's receive time, not the document's
        ``ts``: a last will carries the ts of the agent's start, older than the
        ``online`` document it replaces. An ``offline`` document keeps the known pack and
        agent version, because a will names the pack served at start-up."""
        stmt = self._insert(schema.devices).values(
            device_id=doc.device,
            first_seen=received_at,
            last_seen=received_at,
            max_seq=0,
            state=doc.state,
            online=doc.online,
            status_ts=doc.ts,
            status_received_at=received_at,
            pack_name=doc.pack_name,
            pack_version=doc.pack_version,
            agent_version=doc.agent_version,
            updated_at=received_at,
        )
        new, cols = stmt.excluded, schema.devices.c
        offline = new.state == "offline"
        changes: dict[str, Any] = {
            name: new[name]
            for name in ("last_seen", "state", "online", "status_ts", "status_received_at", "updated_at")
        }
        for name in ("pack_name", "pack_version", "agent_version"):
            changes[name] = case((offline, cols[name]), else_=new[name])
        upsert = stmt.on_conflict_do_update(
            index_elements=[cols.device_id],
            set_=changes,
            where=or_(cols.status_received_at.is_(None), cols.status_received_at <= new.status_received_at),
        ).returning(cols.device_id)
        if conn.execute(upsert).first() is None:
            return False
        self._replace_labels(conn, doc.device, "hardware", doc.hardware)
        self._replace_labels(conn, doc.device, "tag", doc.tags)
        return True

    def _replace_labels(self, conn: Connection, device: str, kind: str, values: Sequence[str] | None) -> None:
        """The document's list replaces the registry's; an absent field (an older agent) keeps it."""
        if values is None:
            return
        lab = schema.device_labels.c
        conn.execute(delete(schema.device_labels).where(lab.device_id == device, lab.kind == kind))
        if values:
            rows = [{"device_id": device, "kind": kind, "value": v} for v in values]
            conn.execute(self._insert(schema.device_labels).values(rows))

    def _add_update_status(self, conn: Connection, ev: UpdateStatus, received_at: float) -> bool:
        row = {
            "device_id": ev.device,
            "source": "update_status",
            "event_key": ev.digest,
            "seq": ev.seq,
            "rollout_id": ev.rollout_id,
            "target": ev.target,
            "state": ev.state,
            "percent": ev.percent,
            "reason_code": ev.reason_code,
            "reason": ev.reason,
            "ts": ev.ts,
            "received_at": received_at,
        }
        self._touch_device(conn, ev.device, received_at)
        stmt = self._insert(schema.update_events).values(row).on_conflict_do_nothing()
        return conn.execute(stmt.returning(schema.update_events.c.seq)).first() is not None

    # ------------------------------------------------------------------ write steps

    def _insert(self, table: Any) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(table) if self._pg else sqlite.insert(table)

    def _touch_device(self, conn: Connection, device: str, now: float) -> int:
        """Upsert the registry row (PostgreSQL locks it until commit) and return its max_seq."""
        return self._touch_devices(conn, {device: now})[device]

    def _touch_devices(self, conn: Connection, last_seen: dict[str, float]) -> dict[str, int]:
        """Upsert the devices' registry rows in one statement, in device order (PostgreSQL
        locks them until commit, so two workers' transactions take the locks in one order
        and never deadlock), and return each one's max_seq."""
        ins = self._insert(schema.devices)
        stmt = ins.on_conflict_do_update(
            index_elements=[schema.devices.c.device_id], set_={"last_seen": ins.excluded.last_seen}
        ).returning(schema.devices.c.device_id, schema.devices.c.max_seq)
        rows = [
            {"device_id": dev, "first_seen": now, "last_seen": now, "max_seq": 0}
            for dev, now in sorted(last_seen.items())
        ]
        if len(rows) == 1:  # a single row: a plain INSERT (executemany would need RETURNING support)
            return {r.device_id: int(r.max_seq) for r in conn.execute(stmt.values(rows[0]))}
        return {r.device_id: int(r.max_seq) for r in conn.execute(stmt, rows)}

    def _insert_record_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
        """Insert what is new; returns the (device, seq) that were (a redelivery returns none)."""
        r = schema.records.c
        stmt = self._insert(schema.records).on_conflict_do_nothing().returning(r.device_id, r.seq)
        if len(rows) == 1:
            return {(x.device_id, x.seq) for x in conn.execute(stmt.values(rows[0]))}
        return {(x.device_id, x.seq) for x in conn.execute(stmt, rows)}

    @staticmethod
    def _telemetry_update_rows(device: str, new: Sequence[Record], now: float) -> list[dict[str, Any]]:
        return [
            {
                "device_id": device,
                "source": "telemetry",
                "event_key": str(r.seq),
                "seq": r.seq,
                "rollout_id": None,
                "target": r.data["target"],
                "state": r.data["state"],
                "percent": None,
                "reason_code": r.data.get("reason_code"),
                "reason": None,
                "ts": r.ts,
                "received_at": now,
            }
            for r in new
            if r.is_update_event()
        ]

    def _advance_gaps(
        self, conn: Connection, device: str, prev_max: int, new: Sequence[Record], now: float
    ) -> int:
        """Load only the gaps the new records can touch (fills below max_seq, dropped
        ranges, and their neighbours for merging), compute, write back the difference;
        returns the device's new max_seq (the caller writes it)."""
        if not new:
            return prev_max
        seqs = [r.seq for r in new]
        dropped = [rng for r in new if (rng := r.dropped_range()) is not None]
        bounds = [s for s in seqs if s < prev_max] + [x for rng in dropped for x in rng]
        known = self._load_gaps(conn, device, min(bounds), max(bounds)) if bounds else {}
        result, new_max = gap_math.advance(list(known), prev_max, seqs, dropped)
        self._write_gaps(conn, device, known, result, now)
        return new_max

    def _load_gaps(self, conn: Connection, device: str, lo: int, hi: int) -> dict[gap_math.Gap, float]:
        g = schema.gaps.c
        rows = conn.execute(
            select(g.from_seq, g.to_seq, g.state, g.detected_at).where(
                g.device_id == device, g.to_seq >= lo - 1, g.from_seq <= hi + 1
            )
        )
        return {gap_math.Gap(r.from_seq, r.to_seq, r.state): r.detected_at for r in rows}

    def _write_gaps(
        self,
        conn: Connection,
        device: str,
        known: dict[gap_math.Gap, float],
        result: Iterable[gap_math.Gap],
        now: float,
    ) -> None:
        """Replace the changed rows; a piece of an older gap keeps its detection time."""
        result = set(result)
        gone = [g.from_seq for g in known if g not in result]
        added = [g for g in result if g not in known]
        g = schema.gaps.c
        if gone:
            conn.execute(delete(schema.gaps).where(g.device_id == device, g.from_seq.in_(gone)))
        if added:
            rows = [
                {
                    "device_id": device,
                    "from_seq": gap.from_seq,
                    "to_seq": gap.to_seq,
                    "state": gap.state,
                    "detected_at": _detected(gap, known, now),
                }
                for gap in added
            ]
            conn.execute(self._insert(schema.gaps).values(rows))

    # ------------------------------------------------------------------ reads

    def device(self, device_id: str) -> DeviceInfo | None:
        found = self.devices([device_id])
        return found[0] if found else None

    def devices(self, ids: Sequence[str] | None = None) -> list[DeviceInfo]:
        d = schema.devices.c
        query = select(*[d[f] for f in DeviceInfo.__dataclass_fields__]).order_by(d.device_id)
        if ids is not None:
            query = query.where(d.device_id.in_(ids))
        with self.engine.connect() as conn:
            return [DeviceInfo(**r._mapping) for r in conn.execute(query)]

    def acked_through(self, device_ids: Iterable[str]) -> dict[str, int]:
        """For each device (one query for all): the highest seq N such that every record
        1..N is stored or in a ``lost`` gap: the first ``open`` gap's ``from_seq`` - 1, else
        ``max_seq``. What the ingest worker acks to the device (``{root}/telemetry/ack``), so
        the device may delete those records. Devices not in the registry are left out."""
        ids = sorted(set(device_ids))
        if not ids:
            return {}
        d, g = schema.devices.c, schema.gaps.c
        first_open = (
            select(func.min(g.from_seq))
            .where(g.device_id == d.device_id, g.state == gap_math.OPEN)
            .scalar_subquery()
        )
        query = select(d.device_id, d.max_seq, first_open.label("first_open")).where(d.device_id.in_(ids))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return {
            r.device_id: int(r.first_open) - 1 if r.first_open is not None else int(r.max_seq) for r in rows
        }

    def gaps(self, device_id: str) -> list[StoredGap]:
        g = schema.gaps.c
        query = select(g.from_seq, g.to_seq, g.state, g.detected_at).where(g.device_id == device_id)
        with self.engine.connect() as conn:
            return [StoredGap(**r._mapping) for r in conn.execute(query.order_by(g.from_seq))]

    def records(
        self, device_id: str, from_seq: int = 1, limit: int = 1000, kind: str | None = None
    ) -> list[StoredRecord]:
        """Records in seq order from ``from_seq``: page with the last seq + 1."""
        r = schema.records.c
        query = select(r.seq, r.ts, r.kind, r.data, r.received_at).where(
            r.device_id == device_id, r.seq >= from_seq
        )
        if kind is not None:
            query = query.where(r.kind == kind)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(r.seq).limit(limit))
            return [StoredRecord(x.seq, x.ts, x.kind, json.loads(x.data), x.received_at) for x in rows]

    def record_count(self, device_id: str | None = None) -> int:
        query = select(func.count()).select_from(schema.records)
        if device_id is not None:
            query = query.where(schema.records.c.device_id == device_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def update_events(self, device_id: str) -> list[UpdateEvent]:
        """Both sources, in the device's time order (``ts``, then receive time)."""
        u = schema.update_events.c
        query = (
            select(*[u[f] for f in UpdateEvent.__dataclass_fields__])
            .where(u.device_id == device_id)
            .order_by(u.ts, u.received_at)
        )
        with self.engine.connect() as conn:
            return [UpdateEvent(**r._mapping) for r in conn.execute(query)]


def _detected(gap: gap_math.Gap, known: dict[gap_math.Gap, float], now: float) -> float:
    overlapping = (t for g, t in known.items() if g.from_seq <= gap.to_seq and gap.from_seq <= g.to_seq)
    return min(overlapping, default=now)


def _sqlite_engine(url: URL, busy_timeout_s: float) -> Engine:
    """WAL (readers never block the writer), synchronous=FULL (a commit the worker acks
    survives a power cut), and BEGIN IMMEDIATE: a transaction takes the write lock when it
    starts, so two processes never both read then fail to upgrade (SQLITE_BUSY mid-way)."""
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # the driver's own BEGINs off: ours below
        cursor = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", f"busy_timeout={int(busy_timeout_s * 1000)}"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine
