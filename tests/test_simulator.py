"""The fleet simulator (fleet/simulator) against a real mosquitto spawned for this module.

Nothing is mocked: the simulated devices, the test's own MQTT clients and the broker talk over
TCP. Each test uses its own topic prefix and device ids, so retained documents and persistent
sessions of one test never reach another.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.localbroker import LocalBroker
from agent.status import status_document
from fleet.devices import add_user
from fleet.simulator import Fleet, Shares, SimConfig, SimulatorError, assign_fates, offline_devices
from fleet.simulator.cli import register, run
from fleet.simulator.fleet import raise_nofile_limit
from fleet.simulator.telemetry import Outbox
from fleet.telemetry.payloads import parse_status, parse_telemetry, parse_update_status
from tests.operators import Operator

THOUSAND = 1000
METRICS_FIELDS = {
    "pack", "agent_version", "uptime_s", "load1", "cpu_temp_c", "rss_mb", "disk_free_mb",
    "queue_depth", "requests", "answers", "reconnects", "reply_failures", "spool",
}  # fmt: skip
INSTALL = ["downloading"] * 5 + ["verifying", "staged", "activated"]  # download_steps=4: 0..100 %
_names = itertools.count(1)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    """This module's own mosquitto, with the file descriptors for a thousand clients (it
    inherits this process's limit) and no cap on connections."""
    raise_nofile_limit(THOUSAND * 2 + 512)
    with LocalBroker(listener_conf="max_connections -1\n") as b:
        yield b


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Operator:
    return Operator(tmp_path_factory.mktemp("operator"))


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None

    def doc(self) -> Any:
        return json.loads(self.payload)


class Recorder:
    """An MQTT 5 client that keeps every message on its filters and publishes for the test."""

    def __init__(self, broker: LocalBroker, *filters: str) -> None:
        """Connects now; subscribes to ``filters`` now, or later with :meth:`subscribe`.
        paho's network loop uses select(), which cannot watch a file descriptor above 1023:
        a recorder for a thousand devices must connect before they do (its socket then has a
        low number), or its loop dies and no SUBACK ever arrives (seen in full-suite runs)."""
        self.seen: list[Seen] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._add
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, r, p: connected.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert connected.wait(30), "the recorder did not connect"
        if filters:
            self.subscribe(*filters)

    def subscribe(self, *filters: str) -> None:
        self._subscribed.clear()
        self.client.subscribe([(t, 1) for t in filters])
        # 30 s: a broker busy with 1,000 connects once took over 10 s to answer it
        assert self._subscribed.wait(30), "the recorder's SUBSCRIBE was not acknowledged"

    def _add(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None)
        with self._cond:
            self.seen.append(Seen(msg.topic, bytes(msg.payload), bool(msg.retain), correlation))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Seen]:
        with self._cond:
            return [s for s in self.seen if s.topic == topic]

    def docs(self, topic: str) -> list[Any]:
        return [s.doc() for s in self.on(topic)]

    def wait(self, done: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
        with self._cond:
            if not self._cond.wait_for(done, timeout_s):
                raise AssertionError(f"timed out waiting for {what}")

    def wait_status(self, topic: str, tail: list[str], version: str | None = None) -> None:
        """Until the newest status documents on ``topic`` have the states ``tail`` (the last
        one naming pack ``version`` when given)."""

        def reached() -> bool:
            docs = self.docs(topic)
            states = [d["state"] for d in docs][-len(tail) :]
            return states == tail and (version is None or docs[-1]["pack"]["version"] == version)

        self.wait(reached, f"{topic}: {tail} {version or ''}")

    def publish(
        self,
        topic: str,
        doc: Any,
        retain: bool = False,
        response: str | None = None,
        corr: bytes | None = None,
    ) -> None:
        props = None
        if response is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response
            if corr is not None:
                props.CorrelationData = corr
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()  # first: it wakes paho's thread, which loop_stop then joins
        self.client.loop_stop()


@pytest.fixture()
def recorders(broker: LocalBroker) -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(*filters: str) -> Recorder:
        made.append(Recorder(broker, *filters))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture()
def fleets() -> Iterator[Callable[..., Fleet]]:
    """Start fleets for one test; all are stopped at its end, pass or fail."""
    started: list[Fleet] = []

    def start(cfg: SimConfig, wait_s: float = 30.0) -> Fleet:
        fleet = Fleet(cfg)
        started.append(fleet)
        return fleet.start(wait_s=wait_s)

    yield start
    for fleet in started:
        fleet.stop()


def config(broker: LocalBroker, **overrides: Any) -> SimConfig:
    """A small, fast fleet under a topic prefix and id prefix of its own."""
    n = next(_names)
    base: dict[str, Any] = dict(
        broker=broker.url, devices=5, topic_prefix=f"sim{n}", id_prefix=f"t{n}-",
        interval_s=0.25, step_delay_s=0.02, resend_delay_s=0.2,
    )  # fmt: skip
    base.update(overrides)
    return SimConfig(**base)


def seqs_of(rec: Recorder, topic: str) -> list[int]:
    return [r["seq"] for doc in rec.docs(topic) for r in doc["records"]]


def update(
    rec: Recorder, op: Operator, cfg: SimConfig, device: str, target: str, **kw: Any
) -> dict[str, Any]:
    """Sign and send an update instruction for ``device``; returns the envelope sent."""
    body = op.sign(
        "update", kw.pop("signed_for", device), rollout_id=kw.pop("rollout", "wave-1"), target=target
    )
    rec.publish(f"{cfg.root(device)}/update", body, **kw)
    return body


def states(rec: Recorder, cfg: SimConfig, device: str) -> list[str]:
    return [e["state"] for e in rec.docs(f"{cfg.root(device)}/update/status")]


def last_status(rec: Recorder, cfg: SimConfig, device: str) -> tuple[str, str] | None:
    """(state, pack version) of the newest status document seen, if any."""
    docs = rec.docs(f"{cfg.root(device)}/status")
    return (docs[-1]["state"], docs[-1]["pack"]["version"]) if docs else None


# ---------------------------------------------------------------- status, will, telemetry


def test_status_documents_online_with_the_agents_fields_and_the_will_marks_offline(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder]
) -> None:
    cfg = config(
        broker, devices=6, tags=("greenhouse", "site=north"),
        hardware=(("x86_64", 0.5), ("aarch64-dotprod", 0.5)),
    )  # fmt: skip
    fleet = fleets(cfg)
    rec = recorders(f"{cfg.topic_prefix}/+/status")  # subscribed after start: the retained ones
    rec.wait(lambda: len(rec.seen) >= 6, "six retained status documents")
    agent_fields = set(json.loads(status_document("x", "online", None)))
    for device in fleet.ids:
        [seen] = rec.on(f"{cfg.root(device)}/status")
        doc = seen.doc()
        assert seen.retain and doc["state"] == "online" and set(doc) == agent_fields
        assert doc["device_id"] == device and doc["tags"] == ["greenhouse", "site=north"]
        assert doc["pack"] == {"name": "smollm2-135m-instruct", "version": "1.0.0"}
        assert doc["hardware"] in (["x86_64"], ["aarch64", "aarch64-dotprod"])
        parsed = parse_status(device, seen.payload)  # what the fleet's ingest accepts
        assert parsed is not None and parsed.online and parsed.hardware == tuple(doc["hardware"])
    assert len({tuple(rec.on(f"{cfg.root(d)}/status")[0].doc()["hardware"]) for d in fleet.ids}) == 2

    killed, stopped = fleet.ids[0], fleet.ids[1]
    fleet.take_offline([killed])  # no DISCONNECT: the broker publishes the will
    fleet.take_offline([stopped], mode="clean")
    for device in (killed, stopped):
        topic = f"{cfg.root(device)}/status"
        rec.wait_status(topic, ["offline"])
    assert not fleet.device(killed).connected and fleet.device(killed).counters.disconnects == 1
    late = recorders(f"{cfg.root(killed)}/status")  # the will is retained
    late.wait(lambda: bool(late.seen), "the retained will")
    assert late.seen[0].retain and late.seen[0].doc()["state"] == "offline"

    fleet.bring_online([killed])
    fleet.wait_ready([killed])
    rec.wait_status(f"{cfg.root(killed)}/status", ["offline", "online"])
    assert fleet.device(killed).counters.connects == 2


def test_telemetry_numbers_records_from_one_and_the_ingest_accepts_every_batch(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder]
) -> None:
    cfg = config(broker, devices=5, interval_s=0.1)
    rec = recorders(f"{cfg.topic_prefix}/+/telemetry")
    fleet = fleets(cfg)
    topics = [f"{cfg.root(d)}/telemetry" for d in fleet.ids]
    rec.wait(lambda: all(len(seqs_of(rec, t)) >= 8 for t in topics), "eight records from each device")
    for device, topic in zip(fleet.ids, topics, strict=True):
        batches = [parse_telemetry(device, s.payload) for s in rec.on(topic)]
        records = [r for b in batches for r in b.records]
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        assert records[0].kind == "event" and records[0].data["event"] == "boot"
        for record in records[1:]:
            assert record.kind == "metrics" and set(record.data) == METRICS_FIELDS
            answers = record.data["answers"]
            assert answers["tokens_per_s_p50"] > 0 and set(answers["ttft_ms"]) == {"p50", "p95"}
            assert answers["latency_ms"]["p95"] >= answers["latency_ms"]["p50"] > answers["ttft_ms"]["p50"]
            assert set(record.data["spool"]) == {"records", "unacked", "oldest_ts", "dropped_total"}
        assert {r.data["pack"]["version"] for r in records} == {"1.0.0"}


# ---------------------------------------------------------------- updates


def test_a_signed_instruction_gives_the_agents_event_sequence_and_the_new_pack(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder], operator: Operator
) -> None:
    cfg = config(broker, devices=3, operator_keys=(operator.pub,), step_delay_s=0.1)
    fleet = fleets(cfg)
    device = fleet.ids[0]
    rec = recorders(f"{cfg.root(device)}/#", "edge-ops/test/replies")
    body = update(rec, operator, cfg, device, "smollm2-135m-instruct@1.1.0",
                  response="edge-ops/test/replies", corr=b"c-1")  # fmt: skip
    rec.wait(lambda: "downloading" in states(rec, cfg, device), "the first event")
    update(rec, operator, cfg, device, "smollm2-135m-instruct@1.2.0", rollout="wave-1b")  # while busy
    rec.wait(lambda: "activated" in states(rec, cfg, device), "activated")
    status = f"{cfg.root(device)}/status"
    rec.wait(lambda: rec.docs(status)[-1]["pack"]["version"] == "1.1.0", "the new pack in the status")

    [started] = [s for s in rec.on("edge-ops/test/replies")]
    assert started.correlation == b"c-1"
    assert started.doc() == {
        "v": 1,
        "id": body["id"],
        "type": "final",
        "seq": 0,
        "result": {"update": "started"},
    }
    assert rec.docs(f"{cfg.root(device)}/replies")[0]["result"] == {
        "update": "busy"
    }  # no reply topic: fallback

    events = [parse_update_status(device, s.payload) for s in rec.on(f"{cfg.root(device)}/update/status")]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    mine = [e for e in events if e.rollout_id == "wave-1"]
    assert [e.state for e in mine] == INSTALL
    assert [e.percent for e in mine[:5]] == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert all(e.percent is None and e.reason_code is None for e in mine[5:])
    [busy] = [e for e in events if e.rollout_id == "wave-1b"]
    assert (busy.state, busy.reason_code, busy.target) == ("rejected", "busy", "smollm2-135m-instruct@1.2.0")
    docs = rec.docs(status)
    assert [d["state"] for d in docs[-2:]] == ["updating", "online"]
    assert docs[-2]["pack"]["version"] == "1.0.0"  # while installing: still the old pack

    view = fleet.device(device)
    assert (view.counters.instructions_received, view.counters.instructions_accepted) == (2, 1)
    assert view.counters.instructions_busy == 1 and view.counters.outcomes == {"activated": 1}
    assert view.pack == {"name": "smollm2-135m-instruct", "version": "1.1.0"} and view.installing is None
    assert fleet.device(fleet.ids[1]).counters.instructions_received == 0

    telemetry = f"{cfg.root(device)}/telemetry"

    def update_records() -> list[dict[str, Any]]:
        records = [r for d in rec.docs(telemetry) for r in d["records"]]
        return [r["data"] for r in records if r["kind"] == "event" and r["data"]["event"] == "update"]

    rec.wait(lambda: "activated" in [u["state"] for u in update_records()], "the activated record")
    assert [u["state"] for u in update_records() if u["rollout_id"] == "wave-1"] == INSTALL[5:]


def test_refusals_carry_the_agents_codes_and_spend_nothing(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder], operator: Operator,
    tmp_path: Path,
) -> None:  # fmt: skip
    cfg = config(broker, devices=2, operator_keys=(operator.pub,))
    fleet = fleets(cfg)
    device, other = fleet.ids
    replies = "edge-ops/refusals"
    rec = recorders(f"{cfg.root(device)}/#", replies)
    target = "smollm2-135m-instruct@1.1.0"

    def send(doc: Any) -> dict[str, Any]:
        before = len(rec.on(replies))
        rec.publish(f"{cfg.root(device)}/update", doc, response=replies)
        rec.wait(lambda: len(rec.on(replies)) > before, "a reply")
        reply: dict[str, Any] = rec.on(replies)[-1].doc()
        return reply

    for_other = operator.sign("update", other, rollout_id="w", target=target)
    assert send(for_other)["code"] == "wrong_device"
    mine = operator.sign("update", device, rollout_id="w", target=target)
    tampered = dict(for_other, signed=mine["signed"])
    assert send(tampered)["code"] == "unauthorized"  # the signature is another body's
    stranger = Operator(tmp_path, "stranger")
    assert send(stranger.sign("update", device, rollout_id="w", target=target))["code"] == "unauthorized"
    assert send({"v": 1, "id": "plain", "rollout_id": "w", "target": target})["code"] == "unauthorized"
    assert send(b"not json")["code"] == "bad_json"
    assert send(operator.sign("update", device, rollout_id="w", target="Bad@1"))["code"] == "update_rejected"
    good = operator.sign("update", device, rollout_id="w", target=target)
    assert send(good)["result"] == {"update": "started"}
    assert send(good)["code"] == "replayed"  # the same bytes again
    older = operator.sign("update", device, rollout_id="w", target=target, seq=1)
    assert send(older)["code"] == "replayed"
    rec.publish(f"{cfg.root(device)}/update", good, response="elsewhere/replies")  # outside edge-ops/#
    rec.wait(lambda: fleet.device(device).counters.instructions_dropped == 1, "the drop")

    counters = fleet.device(device).counters
    assert counters.refusals == {"wrong_device": 1, "unauthorized": 3, "bad_json": 1, "update_rejected": 1,
                                 "replayed": 2}  # fmt: skip
    assert (counters.instructions_received, counters.instructions_accepted) == (10, 1)
    assert fleet.totals()["refusals"] == dict(counters.refusals)  # merged counts, not (key, count) pairs
    assert states(rec, cfg, device)[0] == "downloading"  # only the good one started an install

    no_keys = fleets(config(broker, devices=1))
    no_keys_rec = recorders(replies)
    no_keys_rec.publish(
        f"{no_keys.config.root(no_keys.ids[0])}/update",
        operator.sign("update", no_keys.ids[0], rollout_id="w", target=target),
        response=replies,
    )
    no_keys_rec.wait(lambda: bool(no_keys_rec.seen), "the forbidden reply")
    assert no_keys_rec.seen[0].doc()["code"] == "forbidden"


def test_misbehaviour_hits_exactly_the_devices_the_seed_predicts(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder], operator: Operator
) -> None:
    shares = Shares(fail=0.2, rollback=0.1, regress=0.1, incompatible=0.1)
    cfg = config(broker, devices=20, seed=7, shares=shares, operator_keys=(operator.pub,), interval_s=0.1)
    predicted = assign_fates(7, cfg.device_ids(), shares)  # known before anything starts
    counts = {f: list(predicted.values()).count(f) for f in ("fail", "rollback", "regress", "incompatible")}
    assert counts == {"fail": 4, "rollback": 2, "regress": 2, "incompatible": 2}  # exact: round(share * 20)
    rec = recorders(f"{cfg.topic_prefix}/+/update/status", f"{cfg.topic_prefix}/+/status",
                    f"{cfg.topic_prefix}/+/telemetry")  # fmt: skip
    fleet = fleets(cfg)
    assert fleet.fates == predicted
    time.sleep(0.6)  # some metrics before the update
    for device in fleet.ids:
        update(rec, operator, cfg, device, "smollm2-135m-instruct@2.0.0")

    def finished(device: str) -> bool:
        ended = states(rec, cfg, device)[-1:] in (["rejected"], ["rolled_back"])
        return ended or last_status(rec, cfg, device) == ("online", "2.0.0")

    rec.wait(lambda: all(finished(d) for d in fleet.ids), "every install to end", timeout_s=30)
    adopted_at = time.time()
    expected = {
        "ok": INSTALL,
        "regress": INSTALL,
        "fail": [*INSTALL[:7], "rejected"],
        "rollback": [*INSTALL, "rolled_back"],
        "incompatible": ["rejected"],
    }
    codes = {"fail": "health_gate", "rollback": "health_probe", "incompatible": "incompatible"}
    for device, fate in predicted.items():
        events = rec.docs(f"{cfg.root(device)}/update/status")
        assert [e["state"] for e in events] == expected[fate], (device, fate)
        assert events[-1]["reason_code"] == codes.get(fate), (device, fate)
        version = "2.0.0" if fate in ("ok", "regress") else "1.0.0"
        rec.wait_status(f"{cfg.root(device)}/status", ["online"], version)
        assert fleet.device(device).counters.instructions_received == 1

    time.sleep(1.0)  # metrics on the new pack

    def speeds(device: str, after: bool) -> list[float]:
        return [r["data"]["answers"]["tokens_per_s_p50"]
                for doc in rec.docs(f"{cfg.root(device)}/telemetry") for r in doc["records"]
                if r["kind"] == "metrics" and (r["ts"] > adopted_at + 0.2) == after
                and r["data"]["pack"]["version"] == ("2.0.0" if after else "1.0.0")]  # fmt: skip

    for device, fate in predicted.items():
        if fate not in ("ok", "regress"):
            continue
        ratio = statistics.mean(speeds(device, True)) / statistics.mean(speeds(device, False))
        if fate == "regress":
            assert 0.4 < ratio < 0.6, (device, ratio)  # --regress-factor 0.5
            assert fleet.device(device).regressed
        else:
            assert 0.85 < ratio < 1.15, (device, ratio)


def test_a_downgrade_is_refused_unless_the_repository_signed_it_as_a_rollback(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder], operator: Operator
) -> None:
    cfg = config(broker, devices=2, operator_keys=(operator.pub,), pack="tiny@1.2.0",
                 rollback_targets=("tiny@1.1.0",))  # fmt: skip
    fleet = fleets(cfg)
    rec = recorders(f"{cfg.topic_prefix}/+/update/status")
    a, b = fleet.ids
    update(rec, operator, cfg, a, "tiny@1.0.0")
    update(rec, operator, cfg, b, "tiny@1.1.0")
    rec.wait(
        lambda: states(rec, cfg, a) == ["rejected"] and states(rec, cfg, b)[-1:] == ["activated"], "both"
    )
    assert rec.docs(f"{cfg.root(a)}/update/status")[0]["reason_code"] == "downgrade"


# ---------------------------------------------------------------- telemetry acks


def test_acks_are_accepted_ignored_or_refused_and_what_is_unacked_is_resent_after_a_reconnect(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder]
) -> None:
    cfg = config(broker, devices=2, interval_s=0.1)
    fleet = fleets(cfg)
    device = fleet.ids[0]
    root = cfg.root(device)
    rec = recorders(f"{root}/telemetry")
    rec.wait(lambda: max(seqs_of(rec, f"{root}/telemetry"), default=0) >= 6, "six records")

    rec.publish(f"{root}/telemetry/ack", {"v": 1, "through_seq": 4}, retain=True)
    rec.wait(lambda: fleet.device(device).acked == 4, "the ack")
    rec.publish(f"{root}/telemetry/ack", {"v": 1, "through_seq": 2})  # lower: ignored
    rec.publish(f"{root}/telemetry/ack", {"v": 1, "through_seq": 10**9})  # never sent: refused
    rec.publish(f"{root}/telemetry/ack", {"v": 1, "through_seq": "5"})  # not acks
    rec.publish(f"{root}/telemetry/ack", {"v": True, "through_seq": 5})
    rec.publish(f"{root}/telemetry/ack", {"v": 1, "through_seq": -1})
    rec.wait(lambda: sum(fleet.device(device).counters.acks.values()) == 6, "six acks handled")
    view = fleet.device(device)
    assert view.counters.acks == {"accepted": 1, "ignored": 1, "ahead": 1, "invalid": 3} and view.acked == 4

    fleet.take_offline([device])
    fleet.wait_offline([device])
    gone_at = len(rec.on(f"{root}/telemetry"))
    sent_before = max(seqs_of(rec, f"{root}/telemetry"))
    time.sleep(0.5)  # records pile up while away
    fleet.bring_online([device])
    fleet.wait_ready([device])
    rec.wait(lambda: max(seqs_of(rec, f"{root}/telemetry")) > sent_before + 5, "records after the reconnect")

    after = [parse_telemetry(device, s.payload) for s in rec.on(f"{root}/telemetry")[gone_at:]]
    seen = sorted({r.seq for b in after for r in b.records})
    assert seen == list(range(5, seen[-1] + 1))  # everything above the retained ack 4, again
    view = fleet.device(device)
    assert view.counters.records_resent >= sent_before - 4
    assert view.counters.acks["ignored"] == 2  # the retained ack 4, delivered again on reconnect
    assert fleet.device(fleet.ids[1]).counters.acks == {}


def test_when_acks_stop_the_backlog_is_sent_again_and_broker_mode_forgets_at_puback(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder]
) -> None:
    cfg = config(broker, devices=1, interval_s=0.1, ack_timeout_s=0.6)
    rec = recorders(f"{cfg.topic_prefix}/+/telemetry")
    fleet = fleets(cfg)
    topic = f"{cfg.root(fleet.ids[0])}/telemetry"
    rec.wait(lambda: seqs_of(rec, topic).count(1) >= 2, "record 1 sent again without an ack")
    assert fleet.device(fleet.ids[0]).counters.records_resent > 0
    assert fleet.device(fleet.ids[0]).counters.connects == 1  # no reconnect: the ack timeout did it

    quiet = fleets(config(broker, devices=1, interval_s=0.1, ack_timeout_s=0.3, ack_mode="broker"))
    time.sleep(1.5)
    view = quiet.device(quiet.ids[0])
    assert view.next_seq > 10 and view.backlog <= 2 and view.counters.records_resent == 0


def test_after_a_broker_restart_every_device_reconnects_and_resends_above_its_ack(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    with LocalBroker(workdir=tmp_path / "broker") as own:
        fleet = Fleet(
            SimConfig(broker=own.url, devices=3, id_prefix="rs-", interval_s=0.1, resend_delay_s=1.0)
        )
        try:
            fleet.start(wait_s=20)
            time.sleep(1.6)  # past the resend delay: records went out on the first connection
            own.stop(kill=True)  # nothing it held survives but its persistence file
            time.sleep(0.5)
            own.start()
            fleet.wait_ready(timeout_s=20)
            rec = Recorder(own, "edge/+/telemetry")
            try:
                rec.wait(lambda: len({s.topic for s in rec.seen}) == 3, "telemetry from all three")
                assert all(seqs_of(rec, s.topic)[0] == 1 for s in rec.seen)  # no ack: from 1 again
            finally:
                rec.close()
            views = fleet.devices()
            assert all(v.counters.connects == 2 and v.counters.records_resent > 0 for v in views), views
        finally:
            fleet.stop()


def test_the_outbox_is_bounded_and_names_what_it_dropped() -> None:
    box = Outbox(max_records=10)
    for i in range(10):
        box.add("metrics", {"i": i})
    box.mark_sent(10)
    assert box.ack(3) == "accepted" and [r.seq for r in box.records] == list(range(4, 11))
    for i in range(4):  # the fourth does not fit: 4 and 5 go, record 14 says so, 15 is the new one
        box.add("metrics", {"i": i})
    assert [r.seq for r in box.records] == list(range(6, 16)) and box.stats()["dropped_total"] == 2
    [dropped] = [r.to_json() for r in box.records if r.kind == "dropped"]
    assert (dropped["seq"], dropped["data"]) == (
        14,
        {"from_seq": 4, "to_seq": 5, "count": 2, "reason": "spool_full"},
    )
    for i in range(5):  # until record 14 itself goes: the next drop record covers its range too
        box.add("metrics", {"i": i})
    last = [r.to_json()["data"] for r in box.records if r.kind == "dropped"][-1]
    assert (last["from_seq"], last["to_seq"]) == (4, 15) and len(box.records) == 10
    assert box.stats()["dropped_total"] == 11  # 4..13 and 15: the records lost, each once


# ---------------------------------------------------------------- offline share, credentials, CLI


def test_the_offline_share_drops_the_predicted_devices_and_brings_them_back(
    broker: LocalBroker, fleets: Callable[..., Fleet], recorders: Callable[..., Recorder]
) -> None:
    cfg = config(broker, devices=10, seed=3, offline_share=0.3, offline_after_s=0.5, offline_for_s=1.0)
    away = offline_devices(3, cfg.device_ids(), 0.3)
    assert len(away) == 3
    rec = recorders(f"{cfg.topic_prefix}/+/status")
    fleet = fleets(cfg)
    for device in away:
        topic = f"{cfg.root(device)}/status"
        rec.wait_status(topic, ["offline", "online"])
    for device in set(fleet.ids) - away:
        assert [d["state"] for d in rec.docs(f"{cfg.root(device)}/status")] == ["online"]


def test_devices_log_in_as_their_id_with_the_password_file(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    ids = SimConfig(devices=3, id_prefix="pw-").device_ids()
    for device in ids:
        add_user(passwd, device, "s3cret")
    (tmp_path / "broker").mkdir()
    with LocalBroker(workdir=tmp_path / "broker", listener_conf=f"password_file {passwd}\n") as b:
        fleet = Fleet(SimConfig(broker=b.url, devices=3, id_prefix="pw-", password="s3cret")).start(wait_s=20)
        assert all(v.connected for v in fleet.devices())
        fleet.stop()
        wrong = Fleet(SimConfig(broker=b.url, devices=1, id_prefix="pw-", password="nope"))
        with pytest.raises(SimulatorError):
            wrong.start(wait_s=2)
        assert wrong.device(ids[0]).counters.connect_failures >= 1
        wrong.stop()


def test_the_cli_runs_a_fleet_for_a_while_and_prints_its_totals(
    broker: LocalBroker, operator: Operator
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fleet.simulator", "--devices", "4", "--broker", broker.url,
         "--prefix", "cli-", "--topic-prefix", "simcli", "--interval", "0.2", "--duration", "1.5",
         "--stats-every", "0.5", "--operator-key", str(operator.pub), "--hardware", "x86_64:1,aarch64:1",
         "--fail-share", "0.25", "--tags", "greenhouse"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["event"] == "connected" and lines[0]["devices"] == 4
    assert lines[-1]["event"] == "stopped" and lines[-1]["connects"] == 4 and lines[-1]["records_sent"] >= 20
    assert any(line["event"] == "stats" and line["cpu_pct"] >= 0 for line in lines)

    parser = argparse.ArgumentParser(prog="edge-fleet")
    register(parser.add_subparsers(dest="group"))
    args = parser.parse_args(["simulate", "--devices", "2", "--broker", broker.url, "--prefix", "reg-",
                              "--topic-prefix", "simreg", "--duration", "0.3"])  # fmt: skip
    assert args.group == "simulate" and run(args) == 0
    bad = parser.parse_args(["simulate", "--fail-share", "1.5"])
    assert run(bad) == 2


def test_every_code_the_simulator_sends_is_one_the_protocol_documents() -> None:
    """Error codes (``Refusal("code", ...)``) and reason codes (``Step(state, percent, code,
    ...)``) written in fleet/simulator must be the agent's documented ones."""
    root = Path(__file__).resolve().parents[1]
    protocol = (root / "docs" / "protocol.md").read_text(encoding="utf-8")
    codes: set[str] = set()
    for path in sorted((root / "fleet" / "simulator").glob("*.py")):
        for call in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)):
            name = getattr(call.func, "id", getattr(call.func, "attr", ""))
            index = {"Refusal": 0, "Step": 2}.get(name)
            arg = call.args[index] if index is not None and len(call.args) > index else None
            if isinstance(arg, ast.Constant):
                codes.add(str(arg.value))
    codes.discard("None")
    assert {"forbidden", "replayed", "busy", "health_gate", "health_probe", "incompatible"} <= codes
    assert sorted(c for c in codes if f"| `{c}` |" not in protocol) == []


# ---------------------------------------------------------------- scale


def test_a_thousand_devices_connect_retain_online_and_stop_cleanly(
    broker: LocalBroker, recorders: Callable[..., Recorder]
) -> None:
    cfg = config(broker, devices=THOUSAND, interval_s=60.0, connect_rate=2000.0, hardware=(("x86_64", 1.0),))
    began = time.monotonic()
    rec, after = recorders(), recorders()  # connected before the thousand sockets (see Recorder)
    fleet = Fleet(cfg)
    try:
        fleet.start(wait_s=45)
        assert fleet.connect_s is not None and fleet.connect_s < 45
        rec.subscribe(f"{cfg.topic_prefix}/+/status")
        rec.wait(lambda: len(rec.seen) >= THOUSAND, "a thousand retained status documents", timeout_s=30)
        assert all(s.retain and s.doc()["state"] == "online" for s in rec.seen)
        assert {s.doc()["device_id"] for s in rec.seen} == set(fleet.ids)
        assert fleet.totals()["connected"] == THOUSAND
    finally:
        fleet.stop(timeout_s=30)
    assert fleet.totals()["connected"] == 0
    after.subscribe(f"{cfg.topic_prefix}/+/status")
    after.wait(lambda: len(after.seen) >= THOUSAND, "the offline documents", timeout_s=30)
    assert all(s.doc()["state"] == "offline" for s in after.seen)
    assert time.monotonic() - began < 60
