"""The router on its own: no Agent, no broker. Messages in, replies captured."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.authority import Authority, ReplayLedger, load_operator_keys
from agent.config import AgentConfig, config_from_mapping
from agent.messages import ReplyTo
from agent.router import Handlers, Router
from agent.scheduling import RateLimiter, Scheduler
from agent.sensors.hub import SensorHub
from agent.telemetry.service import TelemetryService
from agent.telemetry.spool import Spool
from agent.transport import Inbound
from tests.operators import default_operator


class Parts:
    """A router built from real parts, with each handler a recording function."""

    def __init__(self, **cfg: Any) -> None:
        self.cfg: AgentConfig = config_from_mapping(
            {
                "device_id": "r1",
                "sensors": [{"name": "temperature", "unit": "°C"}],
                "security": {"operator_keys": [str(default_operator().pub)]},
                **cfg,
            },
            env={},
        )
        self.replies: list[tuple[str, dict[str, Any]]] = []
        self.replied = threading.Condition()
        self.reload_gate = threading.Event()
        self.updates: list[dict[str, Any]] = []
        self.refused: list[tuple[str, str]] = []
        self.hub = SensorHub(self.cfg)
        self.scheduler = Scheduler(self.cfg.limits)
        self._ledger_dir = tempfile.TemporaryDirectory(prefix="router-ledger-")  # removed with the harness
        ledger = ReplayLedger(Path(self._ledger_dir.name) / "instructions.json")
        self.authority = Authority(
            load_operator_keys(self.cfg.security.operator_keys), self.cfg.device_id, ledger
        )
        handlers = Handlers(
            reply=self._reply,
            status=lambda client: {"state": "online", "asked_by": client},
            reload=self._reload,
            update=lambda data: self.updates.append(data) or "started",  # type: ignore[func-returns-value]
            authorize=self.authority.check,
            pack_info=lambda: {"name": "p", "version": "1.0.0"},
            refused=lambda topic, why: self.refused.append((topic, why)),
        )
        limiter = RateLimiter(self.cfg.limits.rate.per_s, self.cfg.limits.rate.burst)
        self.router = Router(lambda: self.cfg, self.hub, self.scheduler, limiter, handlers)

    def _reply(self, target: ReplyTo, body: dict[str, Any]) -> None:
        with self.replied:
            self.replies.append((target.topic, body))
            self.replied.notify_all()

    def _reload(self) -> dict[str, Any]:
        assert self.reload_gate.wait(10), "the test never let the reload finish"
        return {"reloaded": True}

    def send(
        self, kind: str, body: dict[str, Any], client: str = "operator", reply: str = "edge-ops/op/r1"
    ) -> None:
        payload = json.dumps({"v": 1, **body}).encode()
        self.router.handle(Inbound(self.cfg.topic(kind), payload, reply, b"c", {"client": client}))

    def reply_to(self, rid: str, timeout_s: float = 10) -> dict[str, Any]:
        with self.replied:
            assert self.replied.wait_for(lambda: any(b.get("id") == rid for _, b in self.replies), timeout_s)
            return next(b for _, b in self.replies if b.get("id") == rid)


def test_read_is_answered_from_the_window_at_once() -> None:
    p = Parts()
    p.router.handle(Inbound(p.cfg.topic("sensors/temperature"), b"21.5"))
    p.send("read", {"id": "r", "sensor": "temperature"})
    reply = p.reply_to("r", 0)
    assert reply["type"] == "final" and reply["value"] == 21.5 and reply["pack"]["version"] == "1.0.0"


def test_query_is_validated_and_queued_for_the_worker() -> None:
    p = Parts()
    p.send("query", {"id": "q", "question": "warm?", "max_tokens": 4})
    job = p.scheduler.next(timeout_s=0)
    assert (
        job is not None and job.id == "q" and job.client == "operator" and job.reply.topic == "edge-ops/op/r1"
    )
    assert not p.replies  # the worker replies, not the router


@pytest.mark.parametrize(
    ("kind", "body", "code"),
    [
        ("query", {"id": "e", "question": ""}, "bad_request"),
        ("query", {"id": "e", "question": "x", "max_tokens": 10_000}, "too_large"),
        ("read", {"id": "e", "sensor": "nope"}, "unknown_sensor"),
        ("cmd", {"id": "e", "cmd": "reload"}, "unauthorized"),
        ("update", {"id": "e", "rollout_id": "r", "target": "p@1.0.1"}, "unauthorized"),
        ("cmd", {"id": "e", "cmd": "cancel", "target_id": "ghost"}, "bad_request"),
    ],
)
def test_bad_requests_get_their_code(kind: str, body: dict[str, Any], code: str) -> None:
    p = Parts()
    p.send(kind, body)
    assert p.reply_to("e", 0)["code"] == code
    assert not p.updates


def test_updates_are_handed_on_only_when_signed_by_a_trusted_operator() -> None:
    p = Parts()
    p.send("update", {"id": "claim", "rollout_id": "r", "target": "p@1.0.1"}, client="ops")
    assert p.reply_to("claim", 0)["code"] == "unauthorized"  # a claimed client key is nothing
    signed = default_operator().sign("update", "r1", id="u", rollout_id="r", target="p@1.0.1")
    p.send("update", {**signed, "target": "p@6.6.6"})  # unsigned fields are ignored
    assert p.reply_to("u", 0)["result"] == {"update": "started"}
    assert [u["target"] for u in p.updates] == ["p@1.0.1"]


def test_reads_and_pings_are_answered_while_a_reload_runs() -> None:
    p = Parts()
    p.router.handle(Inbound(p.cfg.topic("sensors/temperature"), b"20"))
    signed = default_operator().sign("reload", "r1", id="reload")
    p.send("cmd", {**signed, "cmd": "reload"})  # blocks until the gate opens
    p.send("read", {"id": "read", "sensor": "temperature"})
    p.send("cmd", {"id": "ping", "cmd": "ping"})
    assert p.reply_to("read", 0)["value"] == 20.0 and p.reply_to("ping", 0)["result"]["pong"]
    assert all(b.get("id") != "reload" for _, b in p.replies)  # still loading
    p.reload_gate.set()
    assert p.reply_to("reload")["result"] == {"reloaded": True}


@pytest.mark.parametrize(
    "topic",
    [
        "edge/other-device/sensors/temperature",  # a reply there would spoof that sensor
        "edge/r1/cmd",  # this device's own tree
        "$SYS/broker/x",
        "edge-ops/#",
        "elsewhere/replies",  # outside replies.allowed_topics
        "edge-ops/\ud800",  # not UTF-8
    ],
)
def test_a_refused_reply_topic_gets_no_publish_at_all(topic: str) -> None:
    p = Parts()
    p.send("read", {"id": "x", "sensor": "temperature"}, reply=topic)  # MQTT 5 response topic
    payload = json.dumps({"v": 1, "id": "y", "sensor": "temperature", "reply_to": topic}).encode()
    p.router.handle(Inbound(p.cfg.topic("read"), payload))  # MQTT 3.1.1 reply_to
    p.router.handle(Inbound(p.cfg.topic("read"), b"not json", topic))  # even a bad_json goes nowhere
    assert p.replies == [] and len(p.refused) == 3


def test_allowed_topics_are_configurable() -> None:
    p = Parts(replies={"allowed_topics": ["site/+/replies/#"]})
    p.send("read", {"id": "ok", "sensor": "temperature"}, reply="site/a/replies/1")
    p.send("read", {"id": "no", "sensor": "temperature"}, reply="edge-ops/op/r1")
    assert [t for t, _ in p.replies] == ["site/a/replies/1"] and len(p.refused) == 1


def test_a_retained_request_is_never_acted_on() -> None:
    """Sent retained, a request would run again on every reconnect (and every restart)."""
    p = Parts()
    payload = json.dumps({"v": 1, "id": "old", "cmd": "ping"}).encode()
    p.router.handle(Inbound(p.cfg.topic("cmd"), payload, "edge-ops/op/r1", None, {}, True, True))
    assert p.replies == [] and p.refused == [(p.cfg.topic("cmd"), "a request must not be retained")]


# ---------------------------------------------------------------- the fleet's telemetry ack


def _with_acks(p: Parts, tmp: Path) -> tuple[Router, TelemetryService]:
    """The router of ``p`` with a real telemetry service (a real spool) taking the acks: one
    record, sent and waiting for the fleet."""
    spool = Spool(tmp / "telemetry.sqlite3", max_records=100, max_age_s=3600)
    spool.append("metrics", {})
    spool.mark_sent(1)

    def no_publish(topic: str, body: bytes, wait_s: float) -> None:
        raise AssertionError("nothing is sent here")

    service = TelemetryService(spool, "r1", p.cfg.topic("telemetry"), dict, no_publish, lambda: True, 1, 1)
    handlers = dataclasses.replace(p.router.h, telemetry_ack=service.handle_ack)
    limiter = RateLimiter(p.cfg.limits.rate.per_s, p.cfg.limits.rate.burst)
    return Router(lambda: p.cfg, p.hub, p.scheduler, limiter, handlers), service


def test_the_ack_topic_is_subscribed_only_when_the_spool_waits_for_the_fleet(tmp_path: Path) -> None:
    assert "edge/r1/telemetry/ack" in _with_acks(Parts(), tmp_path)[0].subscriptions()
    for telemetry in ({"ack": "broker"}, {"enabled": False}):
        router, _ = _with_acks(Parts(telemetry=telemetry), tmp_path / str(telemetry))
        assert not [t for t in router.subscriptions() if "telemetry" in t]
    assert "edge/r1/telemetry/ack" not in Parts().router.subscriptions()  # no handler given


def test_a_retained_ack_is_taken_and_never_reaches_the_request_path(tmp_path: Path) -> None:
    p = Parts()
    router, service = _with_acks(p, tmp_path)
    ack = Inbound(
        "edge/r1/telemetry/ack", b'{"v": 1, "through_seq": 1}', "edge-ops/op/r1", b"c", {}, True, True
    )
    router.handle(ack)
    assert service.acks == {"advanced": 1} and service.spool.stats()["records"] == 0
    assert p.replies == [] and p.refused == [] and p.scheduler.depth == 0


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\xff", b"null", b'{"v": 1, "through_seq": "all"}', b'{"cmd": "reload"}', b"x" * 5000],
)
def test_garbage_on_the_ack_topic_is_counted_not_raised(tmp_path: Path, payload: bytes) -> None:
    p = Parts()
    router, service = _with_acks(p, tmp_path)
    router.handle(Inbound("edge/r1/telemetry/ack", payload, None, None, {}, True, False))
    assert sum(service.acks.values()) == 1 and "advanced" not in service.acks
    assert service.spool.stats()["records"] == 1  # nothing deleted
    assert p.replies == [] and p.refused == [] and p.scheduler.depth == 0


def test_an_ack_under_the_broker_mode_is_dropped(tmp_path: Path) -> None:
    """A persistent session subscribed under an earlier config may still deliver one."""
    p = Parts(telemetry={"ack": "broker"})
    router, service = _with_acks(p, tmp_path)
    router.handle(Inbound("edge/r1/telemetry/ack", b'{"v": 1, "through_seq": 1}', retain=True))
    assert not service.acks and service.spool.stats()["records"] == 1 and p.replies == []
