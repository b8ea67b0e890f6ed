"""Fleet telemetry: the store on SQLite and PostgreSQL, the ingest worker on a real broker.

Real parts only: the session's private mosquitto, SQLite files in tmp_path, and a throwaway
database on the PostgreSQL server at 127.0.0.1:5432 (EDGE_FLEET_TEST_PG to use another),
created for the session and dropped at its end; each test gets its own schema in it.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from agent.localbroker import LocalBroker
from fleet.telemetry import gaps as gap_math
from fleet.telemetry import migrations, schema
from fleet.telemetry.errors import InvalidPayload, StoreError
from fleet.telemetry.ingest import IngestConfig, IngestWorker
from fleet.telemetry.payloads import Batch, parse_status, parse_telemetry, parse_update_status
from fleet.telemetry.store import BatchResult, TelemetryStore
from tests.fleet_telemetry_support import (
    Publisher,
    WorkerProcess,
    dropped,
    metrics,
    status,
    telemetry,
    update_event,
    wait_until,
)

PG_ADMIN = os.environ.get("EDGE_FLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One throwaway database per test session, dropped at the end even if tests fail."""
    name = f"edge_fleet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN} is needed (EDGE_FLEET_TEST_PG): {exc}")
    yield make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture()
def pg_url(pg_database: str) -> str:
    """The session database with a fresh schema of its own first on the search path."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    engine.dispose()
    return f"{pg_database}?options=-csearch_path%3D{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "telemetry.sqlite3")
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture()
def store(db_url: str) -> Iterator[TelemetryStore]:
    s = TelemetryStore.open(db_url)
    yield s
    s.close()


def ingest(store: TelemetryStore, device: str, records: list[dict[str, object]]) -> tuple[int, int]:
    result = store.ingest(parse_telemetry(device, telemetry(device, records)), time.time())
    return result.stored, result.duplicates


def gap_list(store: TelemetryStore, device: str) -> list[tuple[int, int, str]]:
    return [(g.from_seq, g.to_seq, g.state) for g in store.gaps(device)]


# ---------------------------------------------------------------- store (both backends)


def test_redelivered_batch_is_stored_once(store: TelemetryStore) -> None:
    records = [metrics(s) for s in range(1, 11)]
    assert ingest(store, "dev-a", records) == (10, 0)
    assert ingest(store, "dev-a", records) == (0, 10)
    assert ingest(store, "dev-a", [metrics(s) for s in range(8, 13)]) == (2, 3)
    assert store.record_count("dev-a") == 12
    assert [r.seq for r in store.records("dev-a")] == list(range(1, 13))
    assert store.records("dev-a", from_seq=12)[0].data == {"uptime_s": 12}
    device = store.device("dev-a")
    assert device is not None and device.max_seq == 12 and gap_list(store, "dev-a") == []


def test_out_of_order_arrival_fills_the_gap(store: TelemetryStore) -> None:
    ingest(store, "dev-b", [metrics(s) for s in (1, 2, 3)])
    ingest(store, "dev-b", [metrics(s) for s in (9, 10)])
    assert gap_list(store, "dev-b") == [(4, 8, "open")]
    detected = store.gaps("dev-b")[0].detected_at
    ingest(store, "dev-b", [metrics(6)])  # a spool draining late, a worker restarted
    assert gap_list(store, "dev-b") == [(4, 5, "open"), (7, 8, "open")]
    assert {g.detected_at for g in store.gaps("dev-b")} == {detected}  # pieces keep the first sighting
    ingest(store, "dev-b", [metrics(s) for s in (4, 5, 7, 8)])
    assert gap_list(store, "dev-b") == []
    assert store.record_count("dev-b") == 10


def test_dropped_record_turns_an_open_gap_lost(store: TelemetryStore) -> None:
    ingest(store, "dev-c", [metrics(s) for s in range(1, 10)])
    ingest(store, "dev-c", [metrics(s) for s in range(25, 31)])
    assert gap_list(store, "dev-c") == [(10, 24, "open")]
    ingest(store, "dev-c", [dropped(31, 10, 19)])
    assert gap_list(store, "dev-c") == [(10, 19, "lost"), (20, 24, "open")]
    ingest(store, "dev-c", [metrics(s) for s in range(20, 25)])
    assert gap_list(store, "dev-c") == [(10, 19, "lost")]
    ingest(store, "dev-c", [metrics(15)])  # acked by the broker before the spool dropped it
    assert gap_list(store, "dev-c") == [(10, 14, "lost"), (16, 19, "lost")]
    # a drop announced in the same batch as the records after it
    ingest(store, "dev-d", [metrics(1), metrics(2), dropped(8, 3, 6)])
    assert gap_list(store, "dev-d") == [(3, 6, "lost"), (7, 7, "open")]


def test_the_ack_point_stops_below_the_first_open_gap_and_passes_lost_ones(store: TelemetryStore) -> None:
    """What the worker acks to a device: every record up to it is stored or named lost."""
    ingest(store, "ack-a", [metrics(s) for s in range(1, 6)])
    ingest(store, "ack-b", [metrics(s) for s in (1, 2, 3, 7)])
    ingest(store, "ack-c", [metrics(1), metrics(2), dropped(6, 3, 5)])
    ingest(store, "ack-d", [metrics(3)])
    ids = ["ack-a", "ack-b", "ack-c", "ack-d", "nobody"]
    assert store.acked_through(ids) == {"ack-a": 5, "ack-b": 3, "ack-c": 6, "ack-d": 0}
    ingest(store, "ack-b", [metrics(s) for s in (4, 5, 6)])
    assert store.acked_through(["ack-b"]) == {"ack-b": 7} and store.acked_through([]) == {}


def test_status_documents_keep_the_registry(store: TelemetryStore) -> None:
    t0 = time.time()
    online = parse_status("dev-e", status("dev-e", "online", ("tiny", "0.0.2")))
    will = parse_status("dev-e", status("dev-e", "offline", ("tiny", "0.0.1")))  # made at start-up
    assert online is not None and will is not None
    assert store.apply_status(online, t0)
    info = store.device("dev-e")
    assert info is not None and info.online and info.state == "online" and info.pack_version == "0.0.2"
    assert store.apply_status(will, t0 + 1)
    info = store.device("dev-e")
    assert info is not None and info.online is False and info.state == "offline"
    assert (info.pack_name, info.pack_version, info.agent_version) == ("tiny", "0.0.2", "0.1.0")
    assert not store.apply_status(online, t0 + 0.5)  # received before the will: stale
    assert store.device("dev-e").online is False  # type: ignore[union-attr]
    assert parse_status("dev-e", b"") is None  # a cleared retained document


def test_update_events_from_both_sources_are_kept_once(store: TelemetryStore) -> None:
    ingest(store, "dev-f", [metrics(1), update_event(2, "downloading"), update_event(3, "activated")])
    ingest(store, "dev-f", [update_event(3, "activated")])  # redelivery
    raw = json.dumps(
        {"v": 1, "rollout_id": "r1", "target": "tiny@0.0.2", "seq": 1, "state": "rejected", "percent": None,
         "reason_code": "hash_mismatch", "reason": "sha256 differs", "ts": time.time() + 5}
    ).encode()  # fmt: skip
    live = parse_update_status("dev-f", raw)
    assert store.add_update_status(live, time.time())
    assert not store.add_update_status(live, time.time())
    events = store.update_events("dev-f")
    assert [(e.source, e.state) for e in events] == [
        ("telemetry", "downloading"),
        ("telemetry", "activated"),
        ("update_status", "rejected"),
    ]
    assert events[-1].reason_code == "hash_mismatch" and events[-1].rollout_id == "r1"


def test_schema_is_migrated_once_and_matches_the_declarations(db_url: str) -> None:
    first = TelemetryStore.open(db_url)
    first.close()
    again = TelemetryStore.open(db_url)  # nothing left to apply
    with again.engine.connect() as conn:
        versions = conn.execute(select(schema.schema_version.c.version)).scalars().all()
        tables = inspect(conn)
        for table in schema.metadata.sorted_tables:
            assert {c["name"] for c in tables.get_columns(table.name)} == set(table.c.keys())
    assert versions == [m.version for m in migrations.MIGRATIONS]
    with again.engine.begin() as conn:
        conn.execute(schema.schema_version.insert().values(version=99, name="future", applied_at=0.0))
    again.close()
    with pytest.raises(StoreError, match="newer"):
        TelemetryStore.open(db_url)


# ---------------------------------------------------------------- pure parts


BAD = [
    (b"\xff\xfe", "not_utf8"),
    (b"{nope", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'{"v": 1, "device": "dev", "records": [{"seq": 1, "ts": NaN, "kind": "metrics"}]}', "not_json"),
    (b"[" * 100_000 + b"]" * 100_000, "too_large"),
    (b'{"a":' * 20 + b"1" + b"}" * 20, "too_complex"),
    (json.dumps({"v": 1, "device": "dev", "records": [metrics(10**20)]}).encode(), "bad_number"),
    (json.dumps({"v": 2, "device": "dev", "records": [metrics(1)]}).encode(), "bad_version"),
    (json.dumps({"v": True, "device": "dev", "records": [metrics(1)]}).encode(), "bad_version"),
    (telemetry("other-dev", [metrics(1)]), "device_mismatch"),
    (json.dumps({"v": 1, "records": [metrics(1)]}).encode(), "bad_field"),
    (telemetry("dev", []), "bad_records"),
    (telemetry("dev", [metrics(s) for s in range(1, 52)]), "bad_records"),
    (telemetry("dev", [metrics(2), metrics(1)]), "bad_order"),
    (telemetry("dev", [metrics(1), metrics(1)]), "bad_order"),
    (telemetry("dev", [{**metrics(1), "seq": 0}]), "bad_record"),
    (telemetry("dev", [{**metrics(1), "seq": "1"}]), "bad_field"),
    (telemetry("dev", [{**metrics(1), "seq": True}]), "bad_field"),
    (telemetry("dev", [{**metrics(1), "kind": "gossip"}]), "bad_record"),
    (telemetry("dev", [{**metrics(1), "data": [1]}]), "bad_field"),
    (telemetry("dev", [{**metrics(1), "ts": "now"}]), "bad_field"),
    (telemetry("dev", [dropped(5, 6, 9)]), "bad_record"),
    (telemetry("dev", [dropped(5, 3, 2)]), "bad_record"),
    (telemetry("dev", [{**update_event(1, "activated"), "data": {"event": "update"}}]), "bad_field"),
    (telemetry("dev", [update_event(1, "activated", target="tiny\x00@1.0.0")]), "bad_field"),
]


@pytest.mark.parametrize(("raw", "reason"), BAD)
def test_malformed_telemetry_is_refused_with_a_stable_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_telemetry("dev", raw)
    assert caught.value.reason == reason


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 60),
    st.randoms(use_true_random=False),
    st.one_of(st.none(), st.tuples(st.integers(1, 60), st.integers(0, 5))),
)
def test_gaps_are_exactly_the_missing_seqs_in_any_arrival_order(
    n: int, rnd: random.Random, drop: tuple[int, int] | None
) -> None:
    order = [s for s in range(1, n + 1) if rnd.random() < 0.7]
    rnd.shuffle(order)
    gaps: list[gap_math.Gap] = []
    top, seen = 0, set()
    for i in range(0, len(order), 3):
        gaps, top = gap_math.advance(gaps, top, order[i : i + 3])
        seen.update(order[i : i + 3])
    lost: set[int] = set()
    if drop is not None and top >= 1:
        first = min(drop[0], top)
        last = min(first + drop[1], top)
        gaps, top = gap_math.advance(gaps, top, [], [(first, last)])
        lost = set(range(first, last + 1)) - seen
    missing = set(range(1, top + 1)) - seen
    assert {s for g in gaps for s in range(g.from_seq, g.to_seq + 1)} == missing
    assert {s for g in gaps if g.state == gap_math.LOST for s in range(g.from_seq, g.to_seq + 1)} == lost
    assert all(a.to_seq + 1 < b.from_seq or a.state != b.state for a, b in itertools.pairwise(gaps))


# ---------------------------------------------------------------- the worker on a real broker


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    """This module's own mosquitto (it shadows the session's): the session's broker holds the
    retained status documents of every agent the suite started, and a worker subscribing to
    edge/+/status would first store all of them (measured: the tests' 15 s waits ran out late
    in a full `make test`)."""
    with LocalBroker() as b:
        yield b


def worker_config(broker: LocalBroker, **overrides: object) -> IngestConfig:
    """A group of its own per test: a stopped worker's session stays in its group."""
    base: dict[str, object] = {
        "broker_url": broker.url,
        "group": f"g-{uuid.uuid4().hex[:8]}",
        "client_id": f"w-{uuid.uuid4().hex[:8]}",
    }
    return IngestConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture()
def worker(broker: LocalBroker, tmp_path: Path) -> Iterator[IngestWorker]:
    store = TelemetryStore.open(str(tmp_path / "worker.sqlite3"))
    w = IngestWorker(worker_config(broker), store)
    w.start()
    assert w.subscribed.wait(10)
    yield w
    w.stop()
    store.close()


def test_worker_refuses_bad_input_and_keeps_ingesting(worker: IngestWorker, broker: LocalBroker) -> None:
    dev = f"dev-{uuid.uuid4().hex[:6]}"
    pub = Publisher(broker.port)
    try:
        pub.publish(f"edge/{dev}/telemetry", telemetry("someone-else", [metrics(1)]))  # device/topic mismatch
        for raw, _ in BAD[:6]:
            pub.publish(f"edge/{dev}/telemetry", raw)
        pub.publish(f"edge/{dev}/status", b'{"v": 1, "state": "asleep"}')
        pub.publish(f"edge/{dev}/update/status", b"not json")
        pub.publish(f"edge/{dev}/telemetry", telemetry(dev, [metrics(1), metrics(2)]))
        pub.publish(f"edge/{dev}/telemetry", telemetry(dev, [metrics(1), metrics(2)]))  # QoS 1 redelivery
        wait_until(lambda: worker.counters.messages == 11, what="11 messages handled")
    finally:
        pub.close()
    counts = worker.counters.snapshot()
    assert counts["invalid"] == 9 and counts["records"] == 2 and counts["duplicates"] == 2
    assert counts["invalid_by_reason"]["device_mismatch"] == 1 and counts["failed"] == 0
    assert counts["lag_p95_s"] is not None and 0 <= counts["lag_p95_s"] < 5
    assert worker.store.record_count() == 2 and worker.store.device("someone-else") is None


def test_worker_acks_each_device_retained_after_the_commit(worker: IngestWorker, broker: LocalBroker) -> None:
    """``{prefix}/{device}/telemetry/ack``, retained, QoS 1: a device subscribing later still
    gets the latest; it stops below an open gap until the missing records come."""
    dev = f"dev-{uuid.uuid4().hex[:6]}"
    pub = Publisher(broker.port)
    try:
        pub.publish(f"edge/{dev}/telemetry", telemetry(dev, [metrics(1), metrics(2)]))
        pub.publish(f"edge/{dev}/telemetry", telemetry(dev, [metrics(5)]))
        wait_until(lambda: worker.store.record_count(dev) == 3, what="3 records stored")
        wait_until(lambda: _retained_ack(broker, dev) == {"v": 1, "through_seq": 2}, what="the ack at 2")
        pub.publish(f"edge/{dev}/telemetry", telemetry(dev, [metrics(3), metrics(4)]))
        wait_until(lambda: _retained_ack(broker, dev) == {"v": 1, "through_seq": 5}, what="the ack at 5")
    finally:
        pub.close()
    assert worker.counters.snapshot()["acks"] >= 2  # coalesced: at most one per device per round


def _retained_ack(broker: LocalBroker, device: str) -> dict[str, object] | None:
    """The retained message a device subscribing now gets on its ack topic, or None (an ack
    published while this probe is subscribed comes live, not retained: not counted)."""
    got: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: got.append(bytes(m.payload)) if m.retain else None
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.subscribe(f"edge/{device}/telemetry/ack", qos=1)
    deadline = time.monotonic() + 1
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    c.loop_stop()
    c.disconnect()
    if not got:
        return None
    doc: dict[str, object] = json.loads(got[0])
    return doc


def test_registry_follows_status_documents_and_the_last_will(broker: LocalBroker, tmp_path: Path) -> None:
    dev = f"dev-{uuid.uuid4().hex[:6]}"
    topic = f"edge/{dev}/status"
    device = Publisher(broker.port, will=(topic, status(dev, "offline")))
    device.publish(topic, status(dev, "online", ("tiny", "0.0.2")), retain=True)  # before any worker runs
    store = TelemetryStore.open(str(tmp_path / "registry.sqlite3"))
    w = IngestWorker(worker_config(broker), store)
    w.start()
    try:
        wait_until(lambda: getattr(store.device(dev), "online", None) is True, what="the retained online")
        device.vanish()  # no DISCONNECT: the broker publishes the will
        wait_until(lambda: getattr(store.device(dev), "online", None) is False, what="the last will")
        info = store.device(dev)
        assert info is not None and info.state == "offline" and info.pack_version == "0.0.2"
    finally:
        w.stop()
        store.close()


def test_a_message_is_acknowledged_only_after_its_commit(broker: LocalBroker, tmp_path: Path) -> None:
    """The database is locked: the worker retries and must not ack. Stopped and started again
    (same session), it gets the message again and stores it."""
    path = tmp_path / "locked.sqlite3"
    cfg = worker_config(broker)
    store = TelemetryStore.open(str(path), busy_timeout_s=0.1)
    first = IngestWorker(cfg, store, retry_max_s=0.2)
    first.start()
    assert first.subscribed.wait(10)
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    dev = f"dev-{uuid.uuid4().hex[:6]}"
    pub = Publisher(broker.port)
    try:
        pub.publish(f"edge/{dev}/telemetry", telemetry(dev, [metrics(1), metrics(2), metrics(3)]))
        wait_until(lambda: first.counters.retries >= 2, what="retries against the locked database")
        first.stop()
        assert first.counters.records == 0
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        pub.close()
    again = IngestWorker(cfg, store)
    again.start()
    try:
        wait_until(lambda: store.record_count(dev) == 3, what="the redelivered message stored")
        assert store.device(dev).max_seq == 3  # type: ignore[union-attr]
    finally:
        again.stop()
        store.close()


def test_two_workers_share_the_load_and_survive_a_kill(broker: LocalBroker, pg_url: str) -> None:
    """Two `edge-fleet ingest` processes in one share group, one PostgreSQL database; one is
    SIGKILLed mid-ingest and restarted: every (device, seq) is stored exactly once, no gaps."""
    TelemetryStore.open(pg_url).close()  # migrated before both start (they would serialize anyway)
    group, devices, per_device = f"g-{uuid.uuid4().hex[:8]}", [f"fleet-{i}" for i in range(5)], 700
    workers = [WorkerProcess(broker.url, pg_url, group, f"{group}-w{i}") for i in (1, 2)]
    for w in workers:
        w.wait_subscribed()
    messages = _sequenced_batches(devices, per_device, random.Random(7))
    store = TelemetryStore.open(pg_url)
    publisher = threading.Thread(target=_publish_paced, args=(broker.port, messages, 0.0), daemon=True)
    publisher.start()
    try:
        wait_until(lambda: store.record_count() >= 800, timeout_s=20, what="a fifth ingested")
        workers[0].kill()
        workers[0] = WorkerProcess(broker.url, pg_url, group, f"{group}-w1")  # same session
        workers[0].wait_subscribed()
        publisher.join(30)
        total = len(devices) * per_device
        wait_until(lambda: store.record_count() == total, timeout_s=30, what=f"{total} records")
        for dev in devices:
            assert [r.seq for r in store.records(dev, limit=per_device + 1)] == list(range(1, per_device + 1))
            assert store.gaps(dev) == [] and store.device(dev).max_seq == per_device  # type: ignore[union-attr]
        stopped = [w.terminate() for w in workers]
        assert all(s["failed"] == 0 and s["invalid"] == 0 for s in stopped)
        assert 0 < stopped[1]["records"] < total, "both workers took a share"
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.kill()
        store.close()


def _sequenced_batches(devices: list[str], per_device: int, rnd: random.Random) -> list[tuple[str, bytes]]:
    """Each device's records 1..per_device in batches of 1-25, the devices interleaved."""
    next_seq = dict.fromkeys(devices, 1)
    out = []
    while next_seq:
        dev = rnd.choice(sorted(next_seq))
        first = next_seq[dev]
        last = min(per_device, first + rnd.randint(1, 25) - 1)
        out.append((f"edge/{dev}/telemetry", telemetry(dev, [metrics(s) for s in range(first, last + 1)])))
        if last == per_device:
            del next_seq[dev]
        else:
            next_seq[dev] = last + 1
    return out


def _publish_paced(port: int, messages: list[tuple[str, bytes]], pause_s: float) -> None:
    pub = Publisher(port)
    try:
        for topic, payload in messages:
            pub.publish(topic, payload)
            time.sleep(pause_s)
    finally:
        pub.close()


def test_ingest_command_names_an_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli import main

    code = main(["ingest", "--db", "postgresql://postgres:secret@127.0.0.1:1/none", "--group", "g"])
    err = capsys.readouterr().err
    assert code == 2 and "edge-fleet: error [store]: cannot open the telemetry database" in err
    assert "secret" not in err


# ---------------------------------------------------------------- batched ingest


def _batch_messages() -> list[tuple[str, list[dict[str, object]]]]:
    """Messages of three devices with everything the store must get right across a batch:
    duplicates inside it, out-of-order fills, a dropped range, an update event."""
    return [
        ("dev-x", [metrics(s) for s in (1, 2, 3)]),
        ("dev-y", [metrics(s) for s in (5, 6)]),
        ("dev-x", [metrics(s) for s in (9, 10)]),
        ("dev-x", [metrics(s) for s in (2, 3, 4)]),  # 2 and 3 are duplicates of this batch's first
        ("dev-z", [update_event(1, "activated")]),
        ("dev-y", [dropped(7, 1, 3)]),
        ("dev-x", [metrics(6)]),
        ("dev-y", [metrics(s) for s in (5, 6)]),  # a whole redelivery inside the batch
        ("dev-z", [update_event(1, "activated"), metrics(2)]),
    ]


def _state(store: TelemetryStore, dev: str) -> tuple[object, ...]:
    info = store.device(dev)
    return (
        info.max_seq if info else None,
        gap_list(store, dev),
        [(r.seq, r.kind, r.data) for r in store.records(dev)],
        [(e.seq, e.state, e.target) for e in store.update_events(dev)],
    )


def test_a_batch_is_stored_as_if_message_by_message(db_url: str) -> None:
    """ingest_many (the worker's one transaction per batch) against ingest one by one: the
    same results per message, records, gaps, max_seq, update events and rollup queue."""
    one_by_one, batched = TelemetryStore.open(db_url), None
    try:
        messages = _batch_messages()
        expected = [ingest(one_by_one, dev, recs) for dev, recs in messages]
        assert expected[3] == (1, 2) and expected[7] == (0, 2)
        before = {dev: _state(one_by_one, dev) for dev, _ in messages}
        with one_by_one.engine.connect() as conn:
            queued = conn.execute(select(schema.unrolled)).all()
        with one_by_one.write() as conn:  # empty the database, then the same messages in one batch
            for table in reversed(schema.metadata.sorted_tables):
                if table.name != "schema_version":
                    conn.execute(table.delete())
        batched = one_by_one
        now = time.time()
        results = batched.ingest_many([(parse_telemetry(d, telemetry(d, r)), now) for d, r in messages])
        assert [(r.stored, r.duplicates) for r in results] == expected
        assert {dev: _state(batched, dev) for dev, _ in messages} == before
        assert before["dev-x"][:2] == (10, [(5, 5, "open"), (7, 8, "open")])
        assert before["dev-y"][:2] == (7, [(1, 3, "lost"), (4, 4, "open")])
        with batched.engine.connect() as conn:
            assert sorted(conn.execute(select(schema.unrolled)).all()) == sorted(queued)
        assert batched.ingest_many([]) == []
    finally:
        one_by_one.close()


def test_a_batch_is_acknowledged_only_after_its_commit(broker: LocalBroker, tmp_path: Path) -> None:
    """Several messages (one of them invalid) queued into one batch while the database is
    locked: the worker retries the batch and acks none of them, not even the invalid one (PUBACKs
    go in arrival order, after the commit). Started again on the same session, it gets every
    one of them again: if one had been acked, the broker would not resend it."""
    path = tmp_path / "locked-batch.sqlite3"
    cfg = worker_config(broker)
    store = TelemetryStore.open(str(path), busy_timeout_s=0.1)
    first = IngestWorker(cfg, store, retry_max_s=0.2, max_wait_s=0.5)  # all the messages in one batch
    first.start()
    assert first.subscribed.wait(10)
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    devs = [f"dev-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    pub = Publisher(broker.port)
    try:
        for i, dev in enumerate(devs * 4):
            pub.publish(
                f"edge/{dev}/telemetry", telemetry(dev, [metrics(i // 3 * 2 + 1), metrics(i // 3 * 2 + 2)])
            )
        pub.publish(f"edge/{devs[0]}/telemetry", b"{not json")
        wait_until(lambda: first.counters.retries >= 2, what="retries against the locked database")
        first.stop()
        assert first.counters.records == 0 and first.counters.messages == 0
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        pub.close()
    again = IngestWorker(cfg, store)
    again.start()
    try:
        # counted, not ==: a retained status document of an earlier test comes with them
        wait_until(
            lambda: again.counters.invalid == 1 and store.record_count() == 24, what="all 13 redelivered"
        )
        for dev in devs:
            assert [r.seq for r in store.records(dev)] == list(range(1, 9)) and store.gaps(dev) == []
            assert store.device(dev).max_seq == 8  # type: ignore[union-attr]
        assert again.counters.invalid == 1 and again.counters.records == 24
    finally:
        again.stop()
        store.close()


def test_a_message_the_database_refuses_does_not_poison_its_batch(
    broker: LocalBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's transaction fails for good (not a transient error): the worker stores its
    messages one by one, counts only the refused one as failed, and acks them all."""
    store = TelemetryStore.open(str(tmp_path / "refused.sqlite3"))
    poison = f"dev-{uuid.uuid4().hex[:6]}"
    real_many = store.ingest_many

    def refusing_many(pairs: list[tuple[Batch, float]]) -> list[BatchResult]:
        if any(batch.device == poison for batch, _ in pairs):
            raise ValueError("the database refuses this one")
        return real_many(pairs)

    monkeypatch.setattr(store, "ingest_many", refusing_many)
    monkeypatch.setattr(store, "ingest", lambda batch, received_at: refusing_many([(batch, received_at)])[0])
    w = IngestWorker(worker_config(broker), store, max_wait_s=0.3)
    w.start()
    assert w.subscribed.wait(10)
    good = f"dev-{uuid.uuid4().hex[:6]}"
    pub = Publisher(broker.port)
    try:
        pub.publish(f"edge/{good}/telemetry", telemetry(good, [metrics(1)]))
        pub.publish(f"edge/{poison}/telemetry", telemetry(poison, [metrics(1)]))
        pub.publish(f"edge/{good}/telemetry", telemetry(good, [metrics(2)]))
        wait_until(lambda: w.counters.failed == 1 and w.counters.records == 2, what="3 messages handled")
        assert store.record_count(good) == 2 and w.counters.messages >= 3  # and a retained status
    finally:
        pub.close()
        w.stop()
        store.close()
