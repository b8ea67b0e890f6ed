"""Device telemetry: the disk spool (real SQLite files), its durability under SIGKILL, and a
running agent whose broker goes away and comes back (real mosquitto, tiny pack): every
sequence number arrives exactly once, in order, and a spool made small reports its drop."""

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
from paho.mqtt.enums import CallbackAPIVersion

from agent.localbroker import LocalBroker
from agent.telemetry.metrics import Answered, Metrics
from agent.telemetry.spool import Spool
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
    spool.ack(2)
    spool.close()
    spool = Spool(tmp_path / "t.sqlite3", max_records=100, max_age_s=3600)
    assert spool.append("event", {"event": "boot"}) == 4
    assert [r.seq for r in spool.pending(10, 10_000)] == [3, 4]
    assert spool.stats()["records"] == 2


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
    """The fleet's subscriber first, then the agent: its boot record (seq 1) goes out at once."""
    cfg = agent_config(
        broker.url, tiny_pack_path, telemetry={"interval_s": 0.2, "drain_rate": 50.0, **telemetry}
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
