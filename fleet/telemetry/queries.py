"""Read side of the fleet's telemetry: the registry by selector, device details, series, summary.

Metrics records are stored as JSON text (both dialects, one schema), so a numeric field is
pulled out here, in Python, rather than with each dialect's JSON operators; the SQL narrows by
device, kind and time first (index ``records_by_kind_time``) and every read is bounded
(``MAX_SCAN`` records), so a query too wide is refused, never slow. Summaries and series
with a step of whole hours read the hourly rollups (rollup.py, retention.py's roller) and the
few records still queued for them instead, and so does any series before the retention
mark, where raw records were pruned.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, exists, func, select, true

from fleet.telemetry import schema
from fleet.telemetry.errors import TelemetryError
from fleet.telemetry.rollup import HOUR, METRIC, Bucket, numeric_leaves, pick
from fleet.telemetry.selectors import Selector, Term

MAX_SCAN = 200_000  # raw records (or rollup rows) one series may read
MAX_BUCKETS = 2_000
AGGREGATIONS = ("avg", "max", "min", "sum")
NOT_ERRORS = ("ok", "queued")  # request outcomes that are not failures


class QueryError(TelemetryError):
    """A query the store refuses as asked; ``reason`` is a stable code for the API."""

    code = "bad_query"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    state: str | None
    online: bool | None
    pack: str | None  # NAME@VERSION
    agent_version: str | None
    hardware: list[str]
    tags: list[str]
    first_seen: float
    last_seen: float
    status_ts: float | None
    max_seq: int


@dataclass(frozen=True)
class SeriesQuery:
    metric: str
    since: float
    until: float
    step: int
    agg: str = "avg"
    devices: tuple[str, ...] | None = None  # None: every device the selector picks
    selector: Selector = field(default_factory=Selector)

    def __post_init__(self) -> None:
        if not METRIC.fullmatch(self.metric):
            raise QueryError(
                "bad_metric", "metric: a dotted path of up to 6 names, e.g. answers.latency_ms.p95"
            )
        if self.agg not in AGGREGATIONS:
            raise QueryError("bad_agg", f"agg: one of {', '.join(AGGREGATIONS)}")
        if not self.since < self.until:
            raise QueryError("bad_range", "since must be before until")
        if self.step < 1 or (self.until - self.since) / self.step > MAX_BUCKETS:
            raise QueryError("bad_step", f"step: at least 1 s and at most {MAX_BUCKETS} buckets in the range")


# ---------------------------------------------------------------- pure helpers


def selector_clause(selector: Selector) -> ColumnElement[bool]:
    return and_(true(), *[_term_clause(t) for t in selector.terms])


def _term_clause(term: Term) -> ColumnElement[bool]:
    d, lab = schema.devices.c, schema.device_labels.c
    if term.key in ("hardware", "tag"):
        return exists().where(lab.device_id == d.device_id, lab.kind == term.key, lab.value == term.value)
    if term.key == "pack":
        clause = d.pack_name == term.value
        return and_(clause, d.pack_version == term.version) if term.version else clause
    return d.state == term.value


# ---------------------------------------------------------------- the queries


class FleetQueries:
    """Reads only; shares the store's engine (and so its pool)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def devices(self, selector: Selector, limit: int = 1000, offset: int = 0) -> list[DeviceRow]:
        d = schema.devices.c
        query = (
            select(schema.devices)
            .where(selector_clause(selector))
            .order_by(d.device_id)
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
            labels = self._labels(conn, [r.device_id for r in rows])
        return [_device_row(r._mapping, labels.get(r.device_id, {})) for r in rows]

    def device(self, device_id: str) -> DeviceRow | None:
        d = schema.devices.c
        with self.engine.connect() as conn:
            row = conn.execute(select(schema.devices).where(d.device_id == device_id)).first()
            labels = self._labels(conn, [device_id]) if row is not None else {}
        return None if row is None else _device_row(row._mapping, labels.get(device_id, {}))

    def device_gaps(self, device_id: str) -> list[dict[str, Any]]:
        g = schema.gaps.c
        query = select(g.from_seq, g.to_seq, g.state, g.detected_at).where(g.device_id == device_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query.order_by(g.from_seq).limit(1000)).all()]

    def update_events(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The newest update events from both sources (telemetry records, update/status)."""
        u = schema.update_events.c
        query = (
            select(u.source, u.rollout_id, u.target, u.state, u.percent, u.reason_code, u.ts)
            .where(u.device_id == device_id)
            .order_by(u.ts.desc(), u.received_at.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def _labels(self, conn: Connection, ids: list[str]) -> dict[str, dict[str, list[str]]]:
        lab = schema.device_labels.c
        found: dict[str, dict[str, list[str]]] = {}
        if not ids:
            return found
        rows = conn.execute(select(lab.device_id, lab.kind, lab.value).where(lab.device_id.in_(ids)))
        for r in rows.all():
            found.setdefault(r.device_id, {}).setdefault(r.kind, []).append(r.value)
        return found

    def latest_record(self, device_id: str, kind: str) -> dict[str, Any] | None:
        r = schema.records.c
        query = (
            select(r.seq, r.ts, r.data, r.received_at)
            .where(r.device_id == device_id, r.kind == kind)
            .order_by(r.seq.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return {"seq": row.seq, "ts": row.ts, "received_at": row.received_at, "data": json.loads(row.data)}

    def recent_events(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        r = schema.records.c
        query = (
            select(r.seq, r.ts, r.kind, r.data)
            .where(r.device_id == device_id, r.kind.in_(("event", "dropped")))
            .order_by(r.seq.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [{"seq": x.seq, "ts": x.ts, "kind": x.kind, "data": json.loads(x.data)} for x in rows]

    def gaps(self, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        g = schema.gaps.c
        query = select(g.device_id, g.from_seq, g.to_seq, g.state, g.detected_at)
        if state is not None:
            query = query.where(g.state == state)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(g.device_id, g.from_seq).limit(limit)).all()
        return [dict(r._mapping) for r in rows]

    def gap_counts(self) -> dict[str, int]:
        g = schema.gaps.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(g.state, func.count()).group_by(g.state)).all()
        return {state: int(n) for state, n in rows}

    def rollup_backlog(self) -> int:
        """Metrics records the roller has not folded yet (small while a service runs)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(schema.unrolled)).scalar_one())

    # ------------------------------------------------------------ series

    def series(self, q: SeriesQuery) -> list[dict[str, float]]:
        """``[{"t": bucket start, "value": ...}]`` for buckets with data, in time order.

        Before ``split`` the rollups answer, plus the records still queued for them (every
        metrics record is in exactly one of the two); from ``split`` on, the raw records. A
        step of whole hours splits at the end (rollups only); a finer one at the retention
        mark, before which raw records were pruned."""
        buckets: dict[int, Bucket] = {}
        with self.engine.connect() as conn:
            split = q.until if q.step % HOUR == 0 else min(q.until, _raw_mark(conn))
            raw = self._device_filter(q, schema.records.c.device_id)
            if split > q.since:
                self._add_rollups(
                    conn, q, self._device_filter(q, schema.metric_rollups.c.device_id), split, buckets
                )
                self._add_raw(conn, q, raw, q.since, split, buckets, queued=True)
            if split < q.until:
                self._add_raw(conn, q, raw, max(q.since, split), q.until, buckets)
        return [{"t": q.since + i * q.step, "value": b.value(q.agg)} for i, b in sorted(buckets.items())]

    def _add_raw(
        self,
        conn: Connection,
        q: SeriesQuery,
        devices: ColumnElement[bool] | None,
        since: float,
        until: float,
        buckets: dict[int, Bucket],
        queued: bool = False,
    ) -> None:
        for ts, data in self._raw(conn, devices, since, until, queued):
            value = pick(data, q.metric)
            if value is not None:
                buckets.setdefault(max(0, int((ts - q.since) // q.step)), Bucket()).add(
                    1, value, value, value
                )

    @staticmethod
    def _device_filter(q: SeriesQuery, column: ColumnElement[str]) -> ColumnElement[bool] | None:
        """None: all devices; else a clause on ``column`` (a device_id) picking the query's."""
        if q.devices is not None:
            return column.in_(q.devices)
        if not q.selector.terms:
            return None
        return column.in_(select(schema.devices.c.device_id).where(selector_clause(q.selector)))

    def _raw(
        self,
        conn: Connection,
        devices: ColumnElement[bool] | None,
        since: float,
        until: float,
        queued: bool = False,
    ) -> Iterator[tuple[float, dict[str, Any]]]:
        """Metrics records by time; ``queued``: only those not yet in the rollups."""
        r, u = schema.records.c, schema.unrolled.c
        query = select(r.ts, r.data).where(r.kind == "metrics", r.ts >= since, r.ts < until)
        if queued:
            query = query.join_from(
                schema.records, schema.unrolled, and_(u.device_id == r.device_id, u.seq == r.seq)
            )
        if devices is not None:
            query = query.where(devices)
        rows = conn.execute(query.limit(MAX_SCAN + 1)).all()
        if len(rows) > MAX_SCAN:
            raise QueryError("range_too_large", f"over {MAX_SCAN} records: narrow the range or the selector")
        for row in rows:
            yield row.ts, json.loads(row.data)

    def _add_rollups(
        self,
        conn: Connection,
        q: SeriesQuery,
        devices: ColumnElement[bool] | None,
        until: float,
        buckets: dict[int, Bucket],
    ) -> None:
        m = schema.metric_rollups.c
        first_hour = int(q.since // HOUR) * HOUR
        query = select(m.hour, m.count, m.sum, m.min, m.max).where(
            m.metric == q.metric, m.hour >= first_hour, m.hour < until
        )
        if devices is not None:
            query = query.where(devices)
        rows = conn.execute(query.limit(MAX_SCAN + 1)).all()
        if len(rows) > MAX_SCAN:
            raise QueryError(
                "range_too_large", f"over {MAX_SCAN} rollup rows: narrow the range or the selector"
            )
        for hour, count, total, low, high in rows:
            index = max(0, int((hour - q.since) // q.step))
            buckets.setdefault(index, Bucket()).add(count, total, low, high)

    # ------------------------------------------------------------ summary

    def summary(self, since: float, until: float) -> dict[str, Any]:
        """Counts now, and request outcomes from the start of ``since``'s hour to ``until``."""
        d, lab = schema.devices.c, schema.device_labels.c
        since = float(int(since // HOUR) * HOUR)
        with self.engine.connect() as conn:
            packs = conn.execute(
                select(d.pack_name, d.pack_version, func.count()).group_by(d.pack_name, d.pack_version)
            )
            states = conn.execute(select(d.state, func.count()).group_by(d.state)).all()
            hardware = conn.execute(
                select(lab.value, func.count()).where(lab.kind == "hardware").group_by(lab.value)
            ).all()
            by_pack = {(f"{n}@{v}" if n else "none"): int(c) for n, v, c in packs.all()}
            outcomes = self._outcomes(conn, since, until)
        total = sum(outcomes.values())
        errors = sum(n for (_, outcome), n in outcomes.items() if outcome not in NOT_ERRORS)
        requests: dict[str, dict[str, int]] = {}
        for (kind, outcome), n in sorted(outcomes.items()):
            requests.setdefault(kind, {})[outcome] = n
        return {
            "devices": sum(by_pack.values()),
            "by_pack": by_pack,
            "by_state": {(s or "unknown"): int(c) for s, c in states},
            "by_hardware": {h: int(c) for h, c in hardware},
            "window": {"since": since, "until": until},
            "requests": requests,
            "requests_total": total,
            "errors_total": errors,
            "error_rate": errors / total if total else None,
        }

    def _outcomes(self, conn: Connection, since: float, until: float) -> Counter[tuple[str, str]]:
        """``requests.KIND.OUTCOME`` summed from ``since`` (an hour's start): the rollups and
        the records still queued for them."""
        m = schema.metric_rollups.c
        rows = conn.execute(
            select(m.metric, func.sum(m.sum))
            .where(m.metric.like("requests.%"), m.hour >= since, m.hour < until)
            .group_by(m.metric)
        )
        counts: Counter[tuple[str, str]] = Counter()
        for metric, total in rows.all():
            _count_outcome(counts, metric, total)
        for _, data in self._raw(conn, None, since, until, queued=True):
            requests = data.get("requests")
            for metric, value in numeric_leaves(requests if isinstance(requests, dict) else {}, "requests."):
                _count_outcome(counts, metric, value)
        return counts


def _count_outcome(counts: Counter[tuple[str, str]], metric: str, value: float) -> None:
    """``requests.query.ok`` -> counts[("query", "ok")]; other shapes are not outcomes."""
    parts = metric.split(".")
    if len(parts) == 3:
        counts[(parts[1], parts[2])] += int(value)


def _raw_mark(conn: Connection) -> float:
    """Raw metrics records before this were pruned (0: none were); retention.py moves it."""
    k = schema.retention_marks.c
    value = conn.execute(select(k.value).where(k.name == schema.RAW_MARK)).scalar()
    return float(value) if value is not None else 0.0


def _device_row(row: Any, labels: Mapping[str, list[str]]) -> DeviceRow:
    pack = f"{row['pack_name']}@{row['pack_version']}" if row["pack_name"] else None
    return DeviceRow(
        device_id=row["device_id"],
        state=row["state"],
        online=row["online"],
        pack=pack,
        agent_version=row["agent_version"],
        hardware=sorted(labels.get("hardware", [])),
        tags=sorted(labels.get("tag", [])),
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        status_ts=row["status_ts"],
        max_seq=row["max_seq"],
    )
