"""The telemetry tables, as SQLAlchemy Core declarations that both dialects understand.

These declarations are what the queries use and what migration 1 created. A later change
to a table is a new migration in migrations.py (and the change here); when one changes a v1
table, migration 1 gets its own frozen copy of that table first.
(tests/test_fleet_telemetry.py compares a migrated database with these declarations.)
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(128), nullable=False),
    Column("applied_at", Double, nullable=False),
)

# The registry: one row per device that ever sent anything. ``max_seq`` is the highest
# telemetry seq stored; the status fields come from the retained status document (or the
# last will) and say who is online; ``*_at``/``*_seen`` are the fleet's clock, ``status_ts``
# the device's.
devices = Table(
    "devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("first_seen", Double, nullable=False),
    Column("last_seen", Double, nullable=False),
    Column("max_seq", BigInteger, nullable=False, server_default="0"),
    Column("state", String(16)),
    Column("online", Boolean),
    Column("status_ts", Double),
    Column("status_received_at", Double),
    Column("pack_name", String(256)),
    Column("pack_version", String(256)),
    Column("agent_version", String(256)),
    Column("updated_at", Double),
)

# Every telemetry record exactly once: (device_id, seq) is its identity, so a redelivered
# message inserts nothing. ``data`` is the record's JSON object as compact text.
records = Table(
    "records",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", Double, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("data", Text, nullable=False),
    Column("received_at", Double, nullable=False),
)

# Missing seq ranges below a device's max_seq: ``open`` (may still come) or ``lost`` (a
# ``dropped`` record named them). Rows are disjoint and never touch one of the same state.
gaps = Table(
    "gaps",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("from_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("to_seq", BigInteger, nullable=False),
    Column("state", String(8), nullable=False),
    Column("detected_at", Double, nullable=False),
)

# Update progress per device, from two sources: ``telemetry`` (event records with
# event=update; ``event_key`` is the record's seq) and ``update_status`` (the live
# update/status topic; its seq restarts with the agent, so ``event_key`` is the payload's hash).
update_events = Table(
    "update_events",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("source", String(16), primary_key=True),
    Column("event_key", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("rollout_id", String(256)),
    Column("target", String(256), nullable=False),
    Column("state", String(256), nullable=False),
    Column("percent", Double),
    Column("reason_code", String(256)),
    Column("reason", Text),
    Column("ts", Double, nullable=False),
    Column("received_at", Double, nullable=False),
    Index("update_events_by_time", "device_id", "ts"),
)

V1_TABLES = (devices, records, gaps, update_events)

# Migration 2: the status document's ``hardware`` and ``tags``, one row per (device, label),
# so a selector (``hardware=aarch64,tag=greenhouse``) is an indexed EXISTS in either dialect
# rather than a scan of JSON text. ``kind`` is ``hardware`` or ``tag``.
device_labels = Table(
    "device_labels",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("value", String(128), primary_key=True),
    Index("device_labels_by_value", "kind", "value"),
)

# Migration 2: hourly rollups of each numeric field of metrics records, folded in by the
# roller (rollup.py) and kept after the raw records are pruned. ``hour`` is the bucket's
# start (Unix seconds, a multiple of 3600).
metric_rollups = Table(
    "metric_rollups",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("hour", BigInteger, primary_key=True, autoincrement=False),
    Column("metric", String(128), primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("sum", Double, nullable=False),
    Column("min", Double, nullable=False),
    Column("max", Double, nullable=False),
    Index("metric_rollups_by_metric", "metric", "hour"),
)

# Migration 2: retention's marks; ``raw_metrics_before``: raw metrics records older than this
# (Unix seconds) were pruned, so series read the rollups there.
RAW_MARK = "raw_metrics_before"
retention_marks = Table(
    "retention_marks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Double, nullable=False),
)

# Migration 2: the metrics records not yet in metric_rollups. Ingest adds one row per new
# metrics record (cheaper than upserting a rollup row per field on every message); the
# roller folds them in and deletes them in one transaction, so every metrics record is
# counted either in the rollups or here, never both.
unrolled = Table(
    "unrolled",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
)

V2_TABLES = (device_labels, metric_rollups, retention_marks, unrolled)

# Migration 3: rollouts (fleet/rollouts/). One row per rollout: its spec (JSON text), its state
# (running, paused, halted, aborted, completed, rolling_back, rolled_back), the wave in progress,
# why it halted, and the lease of the one driver that may act on it (``lease_owner`` until
# ``lease_until``, the fleet's clock): every write a driver makes renews the lease in the same
# transaction and fails when another holds it (fleet/rollouts/store.py).
rollouts = Table(
    "rollouts",
    metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("target", String(256), nullable=False),
    Column("selector", Text),
    Column("spec", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("current_wave", Integer, nullable=False),
    Column("halt", Text),
    Column("overridden_waves", Text, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("deadline", Double, nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_until", Double),
)

# Migration 3: a rollout's waves: the canary first, then the percentages or counts of its spec.
rollout_waves = Table(
    "rollout_waves",
    metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("wave", Integer, primary_key=True, autoincrement=False),
    Column("size", Integer, nullable=False),
    Column("started_at", Double),
    Column("completed_at", Double),
    Column("soak_until", Double),
)

# Migration 3: each device of a rollout: its wave, its state, the pack it had when the rollout
# began (what a rollback sends it back to), and the signed instruction as it was committed
# before it was published (``envelope``; ``published_at`` is set once the broker acknowledged
# it): a driver that takes over republishes exactly those bytes, which a device that already
# has them refuses as replayed, so no device acts on an instruction twice. ``rb_*``: the same
# for the rollback instruction.
rollout_devices = Table(
    "rollout_devices",
    metadata,
    Column("rollout_id", String(64), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("wave", Integer, nullable=False),
    Column("state", String(24), nullable=False),
    Column("reason_code", String(64)),
    Column("reason", Text),
    Column("from_pack", String(300)),
    Column("envelope", Text),
    Column("sent_at", Double),
    Column("published_at", Double),
    Column("activated_at", Double),
    Column("confirmed_at", Double),
    Column("updated_at", Double, nullable=False),
    Column("rb_state", String(24)),
    Column("rb_envelope", Text),
    Column("rb_sent_at", Double),
    Column("rb_published_at", Double),
    Index("rollout_devices_by_state", "rollout_id", "state"),
)

V3_TABLES = (rollouts, rollout_waves, rollout_devices)
