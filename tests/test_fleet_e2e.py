"""End to end: real agents (tiny pack) whose network to the broker is cut and restored -> a
real broker -> a real ingest worker -> the store. Every sequence number arrives exactly once,
in order, no gap; with the spool made small the loss is a `lost` gap over exactly the range
the device named.

The network is the one fake in the first test: a TCP relay between the agents and mosquitto
that the test cuts (every connection closed, nothing accepted) and restores. The second test
restarts mosquitto itself: measured with mosquitto 2.0.11, records the agents sent right after
a broker restart, before the worker's shared subscription was back, never reached the worker
(the broker acknowledged them and had no subscriber yet); the fleet's telemetry ack is what
brings them back."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.localbroker import LocalBroker
from fleet.telemetry.ingest import IngestConfig, IngestWorker
from fleet.telemetry.store import TelemetryStore
from tests.conftest import RunningAgent, agent_config


class Relay:
    """A TCP relay to the broker that can be cut: the agents' network."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
            server.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[tuple[LocalBroker, TelemetryStore, IngestWorker]]:
    """A broker of its own (restartable, persistent) and one ingest worker on an SQLite store."""
    (tmp_path / "broker").mkdir()
    with LocalBroker(workdir=tmp_path / "broker") as broker:
        store = TelemetryStore.open(str(tmp_path / "fleet.sqlite3"))
        cfg = IngestConfig(broker_url=broker.url, group=f"e2e-{uuid.uuid4().hex[:6]}", client_id="e2e-w1")
        worker = IngestWorker(cfg, store, retry_max_s=0.5)
        worker.start()
        assert worker.subscribed.wait(10)
        yield broker, store, worker
        worker.stop()
        store.close()


def _agent(relay: Relay, broker: LocalBroker, pack: Path, start_agent: Any, **telemetry: Any) -> RunningAgent:
    cfg = agent_config(relay.url, pack, telemetry={"interval_s": 0.2, "drain_rate": 50.0, **telemetry})
    ra: RunningAgent = start_agent(cfg, broker)
    return ra


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_agents_through_a_broker_outage_into_the_fleet_store(
    site: tuple[LocalBroker, TelemetryStore, IngestWorker], tiny_pack_path: Path, start_agent: Any
) -> None:
    broker, store, _ = site
    relay = Relay(broker.port)
    steady = _agent(relay, broker, tiny_pack_path, start_agent)
    small = _agent(relay, broker, tiny_pack_path, start_agent, max_records=5)
    ids = (steady.cfg.device_id, small.cfg.device_id)
    _wait(lambda: all(store.record_count(d) >= 3 for d in ids), 30, "both devices in the store")

    relay.cut()  # the agents' network goes away: both keep spooling
    time.sleep(3.0)
    relay.restore()

    def caught_up(device: str) -> bool:
        info = store.device(device)
        return (
            info is not None
            and info.max_seq > 20
            and not [g for g in store.gaps(device) if g.state == "open"]
        )

    _wait(lambda: all(caught_up(d) for d in ids), 60, "both devices caught up with no open gap")

    assert steady.agent.transport.connects >= 2 and small.agent.transport.connects >= 2  # the cut was real
    steady_seqs = [r.seq for r in store.records(ids[0], limit=10_000)]
    assert steady_seqs == list(range(1, len(steady_seqs) + 1))  # exactly once, in order
    assert store.gaps(ids[0]) == []

    lost = [g for g in store.gaps(ids[1]) if g.state == "lost"]
    drops = [r.data for r in store.records(ids[1], limit=10_000, kind="dropped")]
    assert lost and drops, (store.gaps(ids[1]), drops)
    named = set().union(*(range(d["from_seq"], d["to_seq"] + 1) for d in drops))
    missing = {s for g in lost for s in range(g.from_seq, g.to_seq + 1)}
    stored = {r.seq for r in store.records(ids[1], limit=10_000)}
    assert missing <= named and not (missing & stored)
    assert stored | missing == set(range(1, max(stored) + 1))  # every number: stored or named lost
    assert store.device(ids[0]).state == "online"  # type: ignore[union-attr]


def test_a_broker_restart_loses_nothing_because_records_wait_for_the_fleets_ack(
    site: tuple[LocalBroker, TelemetryStore, IngestWorker], tiny_pack_path: Path, start_agent: Any
) -> None:
    """The case the fleet's ack exists for: mosquitto stops and starts again (same port, its
    persistence) while telemetry flows. The agent is back within a second, the worker's shared
    subscription only when the worker reconnects (paho's backoff, 1 s and up), and in between
    the broker PUBACKs telemetry that reaches no one. Deleted at that PUBACK
    (``telemetry.ack: broker``) those records stay an open gap for good (measured: every run
    of this test in broker mode ended with one); kept until the fleet's ack covers them, they
    go again (after ``ack_timeout_s``) and the store has every seq exactly once."""
    broker, store, worker = site
    cfg = agent_config(
        broker.url, tiny_pack_path, telemetry={"interval_s": 0.2, "drain_rate": 50.0, "ack_timeout_s": 2.0}
    )
    ra: RunningAgent = start_agent(cfg, broker)
    device = cfg.device_id
    assert ra.agent.telemetry is not None
    spool = ra.agent.telemetry.spool
    _wait(lambda: spool.marks().acked_through >= 5, 30, "the fleet's first acks")

    broker.stop()
    time.sleep(0.5)
    broker.start()
    _wait(lambda: ra.agent.transport.connects >= 2, 15, "the agent back on the restarted broker")
    made_after = spool.append("event", {"event": "test_marker"})  # a record made after the restart

    def caught_up() -> bool:
        info = store.device(device)
        return info is not None and info.max_seq >= made_after and not store.gaps(device)

    _wait(caught_up, 60, "every record stored with no gap")
    seqs = [r.seq for r in store.records(device, limit=10_000)]
    assert seqs == list(range(1, len(seqs) + 1))  # exactly once, in order
    _wait(lambda: spool.marks().acked_through >= made_after, 15, "the fleet's ack of them all")
    with contextlib.closing(sqlite3.connect(spool.path)) as db:  # acked records are off the disk
        assert db.execute("SELECT COUNT(*) FROM records WHERE seq <= ?", (made_after,)).fetchone() == (0,)
    assert worker.counters.snapshot()["acks"] > 0
