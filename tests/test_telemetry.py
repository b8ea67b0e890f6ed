"""Device telemetry: the disk spool (real SQLite files), its durability under SIGKILL, the
fleet's ack (a record is deleted only when the fleet says it stored it; sent again on a new
connection or when acks stop), and a running agent whose broker goes away and comes back
(real mosquitto, tiny pack): every sequence number arrives exactly once, in order, and a spool
made small reports its drop. The fleet's side of the ack: tests/test_fleet_e2e.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import config_from_mapping
from agent.errors import ConfigError
from agent.localbroker import LocalBroker
from agent.telemetry.ack import MAX_ACK_BYTES, BadAck, parse_ack
from agent.telemetry.metrics import Answered, Metrics
from agent.telemetry.service import TelemetryService
from agent.telemetry.spool import ADVANCED, AHEAD, SCHEMA, STALE, Spool
from tests.conftest import RunningAgent, agent_config


class Clock:
    """The spool's wall clock, moved by hand (a clock is external: the one thing faked here)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_sequence_numbers_go_on_across_reopening_and_acks_delete_a_prefix(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)
    assert [spool.append("metrics", {"i": i}) for i in range(3)] == [1, 2, 3]
    spool.mark_sent(3)
    assert spool.ack(2) == ADVANCED
    spool.close()
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)
    assert spool.append("event", {"event": "boot"}) == 4
    assert [r.seq for r in spool.pending(10, 10_000)] == [4]  # 3 was sent: it waits for its ack
    assert spool.rewind() == 1
    assert [r.seq for r in spool.pending(10, 10_000)] == [3, 4]
    assert spool.stats()["records"] == 2


def test_a_sent_record_stays_on_disk_until_the_fleet_acks_it(tmp_path: Path) -> None:
    """The broker's PUBACK only marks a record sent; the fleet's ack deletes it. Acks only
    move forward, and one above what was ever sent is refused."""
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)
    for i in range(4):
        spool.append("metrics", {"i": i})
    spool.mark_sent(3)
    assert [r.seq for r in spool.pending(10, 10_000)] == [4]
    spool.close()
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)  # a restart keeps both marks
    assert spool.stats()["records"] == 4 and spool.stats()["unacked"] == 3
    assert spool.ack(4) == AHEAD  # 4 was never sent: a store that is not this history, or a forgery
    assert spool.stats()["records"] == 4
    assert spool.ack(2) == ADVANCED
    assert spool.stats()["records"] == 2
    assert spool.ack(1) == STALE and spool.ack(2) == STALE  # a lower or repeated (retained) ack
    assert spool.stats()["records"] == 2
    m = spool.marks()
    assert (m.sent_through, m.acked_through, m.sent_max) == (3, 2, 3) and m.outstanding
    assert spool.ack(3) == ADVANCED and not spool.marks().outstanding
    assert [r.seq for r in spool.pending(10, 10_000)] == [4]


def test_rewind_sends_the_unacked_tail_again_and_a_late_ack_still_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)
    for i in range(6):
        spool.append("metrics", {"i": i})
    spool.mark_sent(5)
    spool.ack(2)
    assert spool.rewind() == 3  # 3, 4, 5 go again
    assert [r.seq for r in spool.pending(10, 10_000)] == [3, 4, 5, 6]
    assert spool.ack(4) == ADVANCED  # from the first sending, after the rewind: not ahead
    assert [r.seq for r in spool.pending(10, 10_000)] == [5, 6]


def test_an_ack_that_overtakes_the_puback_is_taken(tmp_path: Path) -> None:
    """The fleet can store a batch and ack it before the broker's PUBACK reaches the device
    (the ack comes on the dispatcher thread): what was offered to the broker is not ahead."""
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)
    for i in range(3):
        spool.append("metrics", {"i": i})
    spool.offer(3)  # before the publish
    assert spool.ack(3) == ADVANCED
    spool.mark_sent(3)  # the PUBACK, late
    assert spool.stats()["records"] == 0 and spool.pending(10, 10_000) == []
    assert not spool.marks().outstanding


def test_broker_mode_deletes_at_the_puback(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)
    for i in range(3):
        spool.append("metrics", {"i": i})
    spool.mark_sent(2, delete=True)
    assert spool.stats()["records"] == 1 and spool.rewind() == 0
    assert [r.seq for r in spool.pending(10, 10_000)] == [3]


def test_drop_records_cover_sent_but_unacked_records(tmp_path: Path) -> None:
    """The bound counts every record still on disk: with the fleet silent, sent records are
    dropped like the rest, and the drop record (new, so unsent) names them."""
    spool = Spool(tmp_path / "t.sqlite3", max_records=5, max_age_s=3600)
    for i in range(4):
        spool.append("metrics", {"i": i})
    spool.mark_sent(4)
    for i in range(4, 8):
        spool.append("metrics", {"i": i})
    assert spool.stats()["records"] <= 5
    unsent = spool.pending(50, 100_000)
    drop = next(r for r in unsent if r.kind == "dropped").data
    assert drop["from_seq"] == 1 and drop["reason"] == "spool_full"
    spool.rewind()
    kept = {r.seq for r in spool.pending(50, 100_000)}
    named = set(range(drop["from_seq"], drop["to_seq"] + 1))
    assert kept | named >= set(range(1, max(kept) + 1))  # every number: still on disk or named


def test_an_agent_spool_written_before_acks_takes_what_it_deleted_as_acknowledged(tmp_path: Path) -> None:
    """A spool file from before the fleet's ack (no marks): it deleted at the PUBACK, so the
    fleet's ack of those seqs is not refused as ahead, and what it holds is still unsent."""
    import sqlite3

    path = tmp_path / "t.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        SCHEMA + "INSERT INTO records VALUES (8, 1.0, 'metrics', '{}'), (9, 2.0, 'metrics', '{}');"
        "INSERT INTO meta VALUES ('next_seq', 10);"
    )
    db.commit()
    db.close()
    spool = Spool(path, max_records=100, max_age_s=10**10)
    assert [r.seq for r in spool.pending(10, 10_000)] == [8, 9]
    assert spool.ack(7) == STALE and spool.ack(9) == AHEAD


class Connections:
    """The transport's connection counter, moved by hand."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        return self.n


def _never_publish(topic: str, body: bytes, wait_s: float) -> None:
    raise AssertionError("these tests mark records sent themselves")


def _service(spool: Spool, clock: Clock, conns: Connections, ack: str = "fleet") -> TelemetryService:
    return TelemetryService(
        spool, "d1", "edge/d1/telemetry", dict, _never_publish, lambda: True, 1.0, 1.0,
        connections=conns, ack=ack, ack_timeout_s=120.0, monotonic=clock,
    )  # fmt: skip


def test_the_unacked_tail_goes_again_on_every_new_connection_and_after_the_ack_timeout(
    tmp_path: Path,
) -> None:
    spool, clock, conns = Spool(tmp_path / "t.sqlite3", 100, 3600), Clock(), Connections()
    svc = _service(spool, clock, conns)
    for i in range(3):
        spool.append("metrics", {"i": i})
    assert svc.resend_if_due() is None  # not connected yet
    conns.n = 1
    assert svc.resend_if_due() == "reconnect" and svc.resend_if_due() is None
    spool.mark_sent(3)
    assert svc.resend_if_due() is None  # the ack clock starts
    clock.now += 119
    assert svc.resend_if_due() is None
    assert svc.handle_ack(b'{"v": 1, "through_seq": 1}') == ADVANCED  # progress: the clock starts again
    clock.now += 119
    assert svc.resend_if_due() is None
    clock.now += 2
    assert svc.resend_if_due() == "ack_timeout"
    assert [r.seq for r in spool.pending(10, 10_000)] == [2, 3]
    spool.mark_sent(3)
    conns.n = 3  # two connections since the last look (a quick reconnect): one rewind
    assert svc.resend_if_due() == "reconnect"
    assert [r.seq for r in spool.pending(10, 10_000)] == [2, 3]
    assert svc.resends == {"reconnect": 2, "ack_timeout": 1}
    assert svc.handle_ack(b'{"v": 1, "through_seq": 3}') == ADVANCED
    clock.now += 1000
    assert svc.resend_if_due() is None and spool.stats()["records"] == 0  # all acked: nothing waits


def test_broker_mode_never_resends(tmp_path: Path) -> None:
    spool, clock, conns = Spool(tmp_path / "t.sqlite3", 100, 3600), Clock(), Connections()
    svc = _service(spool, clock, conns, ack="broker")
    spool.append("metrics", {})
    spool.mark_sent(1, delete=True)
    conns.n, clock.now = 2, clock.now + 1000
    assert svc.resend_if_due() is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "bad_json"),
        (b"not json", "bad_json"),
        (b"[1]", "bad_json"),
        (b'{"through_seq": 3}', "bad_version"),
        (b'{"v": 2, "through_seq": 3}', "bad_version"),
        (b'{"v": true, "through_seq": 3}', "bad_version"),
        (b'{"v": 1}', "bad_through_seq"),
        (b'{"v": 1, "through_seq": -1}', "bad_through_seq"),
        (b'{"v": 1, "through_seq": true}', "bad_through_seq"),
        (b'{"v": 1, "through_seq": 3.0}', "bad_through_seq"),
        (b'{"v": 1, "through_seq": "3"}', "bad_through_seq"),
        (b'{"v": 1, "through_seq": 3, "pad": "' + b"x" * MAX_ACK_BYTES + b'"}', "too_large"),
    ],
)
def test_a_malformed_ack_is_refused_with_a_reason_and_counted(
    tmp_path: Path, payload: bytes, reason: str
) -> None:
    with pytest.raises(BadAck) as err:
        parse_ack(payload)
    assert err.value.reason == reason
    spool, clock, conns = Spool(tmp_path / "t.sqlite3", 100, 3600), Clock(), Connections()
    spool.append("metrics", {})
    spool.mark_sent(1)
    svc = _service(spool, clock, conns)
    assert svc.handle_ack(payload) == reason  # counted, never raised
    assert svc.acks == {reason: 1} and spool.stats()["records"] == 1
    assert parse_ack(b'{"v": 1, "through_seq": 0, "other": null}') == 0  # unknown fields: ignored


def test_an_ack_ahead_of_what_was_sent_is_refused_and_counted(tmp_path: Path) -> None:
    spool, clock, conns = Spool(tmp_path / "t.sqlite3", 100, 3600), Clock(), Connections()
    svc = _service(spool, clock, conns)
    spool.append("metrics", {})
    spool.mark_sent(1)
    assert svc.handle_ack(b'{"v": 1, "through_seq": 500}') == AHEAD
    assert svc.acks == {AHEAD: 1} and spool.stats()["records"] == 1


@pytest.mark.parametrize("telemetry", [{"ack": "fleets"}, {"ack": ""}, {"ack_timeout_s": 0}])
def test_telemetry_ack_settings_are_checked(telemetry: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="telemetry"):
        config_from_mapping({"device_id": "d1", "telemetry": telemetry}, env={})
    assert config_from_mapping({"device_id": "d1"}, env={}).telemetry.ack == "fleet"


def test_a_full_spool_drops_the_oldest_and_says_which(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "t.sqlite3", max_records=5, max_age_s=3600)
    for i in range(12):
        spool.append("metrics", {"i": i})
    pending = spool.pending(50, 100_000)
    assert len(pending) <= 5
    dropped = [r for r in pending if r.kind == "dropped"]
    assert len(dropped) == 1  # earlier drop records were folded into the last one
    d = dropped[0].data
    kept = {r.seq for r in pending}
    lost = set(range(d["from_seq"], d["to_seq"] + 1)) - kept
    assert d["from_seq"] == 1 and d["count"] == len(lost) and d["reason"] == "spool_full"
    assert kept | lost == set(range(1, max(kept) + 1))  # every number is delivered-to-be or named lost
    kept_metrics = sum(r.kind == "metrics" for r in pending)
    assert spool.stats()["dropped_total"] == 12 - kept_metrics  # metrics records lost (drop records aside)


def test_records_older_than_the_bound_are_dropped_as_too_old(tmp_path: Path) -> None:
    clock = Clock()
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=60, clock=clock)
    spool.append("metrics", {"i": 0})
    spool.append("metrics", {"i": 1})
    clock.now += 61
    spool.append("metrics", {"i": 2})
    kinds = [(r.kind, r.data) for r in spool.pending(10, 10_000)]
    assert kinds[0] == ("dropped", {"from_seq": 1, "to_seq": 2, "count": 2, "reason": "too_old"})
    assert kinds[1] == ("metrics", {"i": 2})


def test_pending_batches_stay_under_the_byte_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)
    for i in range(10):
        spool.append("event", {"blob": "x" * 1000, "i": i})
    batch = spool.pending(50, 3500)
    assert 1 <= len(batch) <= 3 and [r.seq for r in batch] == list(range(1, len(batch) + 1))


WRITER = """
import sys
from pathlib import Path
from agent.telemetry.spool import Spool
spool = Spool(Path(sys.argv[1]), max_records=100000, max_age_s=3600)
i = 0
while True:
    seq = spool.append("metrics", {"i": i})
    print(seq, flush=True)
    i += 1
"""


def test_a_sigkill_loses_no_record_that_was_appended(tmp_path: Path) -> None:
    """The stated policy (WAL, synchronous=FULL, one transaction per record): every append
    that returned is on disk, whenever the process dies."""
    path = tmp_path / "t.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acknowledged = [int(proc.stdout.readline()) for _ in range(300)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    on_disk = [r.seq for r in Spool(path, max_records=100000, max_age_s=3600).pending(100000, 10**9)]
    assert set(acknowledged) <= set(on_disk)
    assert on_disk == list(range(1, len(on_disk) + 1))  # and nothing half-written


def test_metrics_count_the_interval_and_start_again() -> None:
    m = Metrics()
    m.request("query", "queued")
    m.request("read", "ok")
    m.request("read", "ok")
    m.answered(Answered(latency_ms=120.0, ttft_ms=30.0, tokens_per_s=40.0, grounded=False))
    first = m.take()
    assert first["requests"] == {"query": {"queued": 1}, "read": {"ok": 2}}
    assert first["answers"]["count"] == 1 and first["answers"]["ungrounded"] == 1
    assert first["answers"]["latency_ms"] == {"p50": 120.0, "p95": 120.0}
    assert m.take()["requests"] == {}


# ---------------------------------------------------------------- a running agent


class Collector:
    """A fleet-side subscriber with a persistent session: it gets what was published while
    it (or the broker) was away."""

    def __init__(self, broker: LocalBroker, topic: str) -> None:
        self.records: list[dict[str, Any]] = []
        self.messages = 0
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fleet-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.set()
        props = mqtt.Properties(mqtt.PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        with self.lock:
            self.messages += 1
            self.records.extend(body["records"])

    def wait_subscribed(self) -> None:
        assert self.subscribed.wait(10), "the fleet subscriber's SUBSCRIBE was not acknowledged"

    def wait_for(self, predicate: Any, timeout_s: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                records = list(self.records)
            if predicate(records):
                return records
            time.sleep(0.05)
        raise AssertionError(f"timed out; got seqs {[r['seq'] for r in self.records]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _telemetry_agent(
    tiny_pack_path: Path, start_agent: Any, broker: LocalBroker, **telemetry: Any
) -> tuple[RunningAgent, Collector]:
    """The fleet's subscriber first, then the agent: its boot record (seq 1) goes out at once.
    The subscriber is no fleet service and sends no acks: ``telemetry.ack: broker``, each
    record sent once and deleted at the PUBACK (the fleet's acks: tests/test_fleet_e2e.py)."""
    cfg = agent_config(
        broker.url,
        tiny_pack_path,
        telemetry={"interval_s": 0.2, "drain_rate": 50.0, "ack": "broker", **telemetry},
    )
    fleet = Collector(broker, cfg.topic("telemetry"))
    fleet.wait_subscribed()
    ra: RunningAgent = start_agent(cfg, broker)
    return ra, fleet


def test_records_survive_a_broker_outage_and_arrive_once_in_order(
    tiny_pack_path: Path, start_agent: Any, tmp_path: Path
) -> None:
    (tmp_path / "broker").mkdir()
    with LocalBroker(workdir=tmp_path / "broker") as broker:
        ra, fleet = _telemetry_agent(tiny_pack_path, start_agent, broker)
        with ra.client() as op:
            assert op.request("query", {"question": "warm?", "max_tokens": 3}, 30)["type"] == "final"
        before = fleet.wait_for(lambda rs: len(rs) >= 5)
        broker.stop()  # the broker goes away; the agent keeps spooling
        time.sleep(2.0)
        spooled = ra.agent.telemetry.spool.stats()["records"] if ra.agent.telemetry else 0
        assert spooled >= 5, spooled
        broker.start()
        last = max(r["seq"] for r in before) + spooled
        records = fleet.wait_for(lambda rs: max(r["seq"] for r in rs) >= last, 60)
        fleet.close()
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(1, max(seqs) + 1)), seqs  # exactly once, in order, no gap
    kinds = {r["kind"] for r in records}
    assert kinds == {"event", "metrics"}
    boot = records[0]["data"]
    assert boot["event"] == "boot" and boot["pack"] == {"name": "tiny", "version": "0.0.1"}
    assert boot["pack_error"] is None and boot["last_update"] is None  # a fresh store: nothing undone
    answered = [r for r in records if r["kind"] == "metrics" and r["data"]["answers"]["count"]]
    assert answered and answered[0]["data"]["requests"]["query"] == {"queued": 1}
    assert any(r["kind"] == "metrics" and r["data"]["reconnects"] >= 1 for r in records)


def test_a_small_spool_reports_what_it_dropped_during_an_outage(
    tiny_pack_path: Path, start_agent: Any, tmp_path: Path
) -> None:
    (tmp_path / "broker").mkdir()
    with LocalBroker(workdir=tmp_path / "broker") as broker:
        _, fleet = _telemetry_agent(tiny_pack_path, start_agent, broker, max_records=5)
        fleet.wait_for(lambda rs: len(rs) >= 2)
        broker.stop()
        time.sleep(3.0)  # about 15 metrics records into a spool of 5
        broker.start()
        records = fleet.wait_for(lambda rs: any(r["kind"] == "dropped" for r in rs), 60)
        time.sleep(0.5)
        with fleet.lock:
            records = list(fleet.records)
        fleet.close()
    got = {r["seq"] for r in records}
    drop = next(r for r in records if r["kind"] == "dropped")["data"]
    named = set(range(drop["from_seq"], drop["to_seq"] + 1))
    missing = set(range(1, max(got) + 1)) - got
    assert missing and missing <= named and drop["count"] == len(named - got)
    assert drop["reason"] == "spool_full"


def test_the_status_document_carries_hardware_and_tags_for_the_registry(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any
) -> None:
    from model_packs import hardware as hw
    from tests.conftest import StatusWatcher

    cfg = agent_config(broker.url, tiny_pack_path, tags=["greenhouse", "site=north"])
    watcher = StatusWatcher(broker, f"edge/{cfg.device_id}/status")
    try:
        start_agent(cfg, broker)
        doc = watcher.wait_state("online")
    finally:
        watcher.close()
    assert doc["tags"] == ["greenhouse", "site=north"]
    assert doc["hardware"] == sorted(hw.detect().tags) and hw.detect().machine in doc["hardware"]
