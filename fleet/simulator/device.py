"""One simulated device: an agent's MQTT behaviour without a model.

It connects with its id as client id (and username when the broker wants passwords), leaves a
retained ``offline`` will, publishes its retained status document on every connect, sends
``metrics`` telemetry every interval, honours telemetry acks, and carries out signed update
instructions by publishing the events a real install would. Everything here runs on the
simulator's loop thread (fleet/simulator/loop.py): paho's callbacks, timers and the fleet's
requests alike, so nothing needs a lock.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.simulator import messages, telemetry
from fleet.simulator.config import SimConfig, host_port
from fleet.simulator.fates import REGRESS, unit
from fleet.simulator.loop import EventLoop, Timer
from fleet.simulator.updates import Gate, Order, Refusal, Step, parse_order, plan
from model_packs import layout

log = structlog.get_logger("edge_fleet.simulator")
F = TypeVar("F", bound=Callable[..., None])
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0
CONNECT_TIMEOUT_S = 2.0


@dataclass
class Counters:
    """What happened to one device, for tests to assert on (e.g. no instruction twice).
    ``instructions_received`` = accepted + busy + refused + dropped."""

    instructions_received: int = 0
    instructions_accepted: int = 0  # an install started
    instructions_busy: int = 0
    instructions_refused: int = 0  # an error reply went out; by code in ``refusals``
    instructions_dropped: int = 0  # retained, or a reply topic the policy refuses: no reply at all
    refusals: Counter[str] = field(default_factory=Counter)
    rollouts: Counter[str] = field(default_factory=Counter)  # verified instructions by rollout_id
    events_sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # activated, rejected, rolled_back
    records_made: int = 0
    records_sent: int = 0  # every record published, resends included
    records_resent: int = 0
    telemetry_batches: int = 0
    acks: Counter[str] = field(default_factory=Counter)  # accepted, ignored, ahead, invalid
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    status_published: int = 0

    def copy(self) -> Counters:
        return replace(
            self,
            refusals=Counter(self.refusals),
            rollouts=Counter(self.rollouts),
            outcomes=Counter(self.outcomes),
            acks=Counter(self.acks),
        )


@dataclass(frozen=True)
class DeviceView:
    """A consistent snapshot of one device, taken on the loop thread."""

    id: str
    fate: str
    hardware: tuple[str, ...]
    connected: bool
    ready: bool  # connected and subscribed
    want_online: bool
    state: str  # what its last status document said
    pack: dict[str, str]
    installing: str | None  # the target of the install in progress
    regressed: bool
    acked: int
    backlog: int  # records kept: not yet acknowledged
    next_seq: int
    event_seq: int
    counters: Counters


def _guarded(method: F) -> F:
    """paho calls these from inside loop_read/loop_write: an exception must not leave the
    client half-way through a packet, so it is logged here instead of raised."""

    @functools.wraps(method)
    def wrapper(self: SimDevice, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:
            log.exception("simulated_device_failed", device=self.id, handler=method.__name__)

    return wrapper  # type: ignore[return-value]


class SimDevice:
    def __init__(
        self,
        device_id: str,
        cfg: SimConfig,
        loop: EventLoop,
        keys: Mapping[str, Ed25519PublicKey],
        fate: str,
        hardware: tuple[str, ...],
    ) -> None:
        self.id, self.cfg, self.loop, self.fate, self.hardware = device_id, cfg, loop, fate, hardware
        root = cfg.root(device_id)
        self.topics = {
            leaf: f"{root}/{leaf}"
            for leaf in ("status", "telemetry", "telemetry/ack", "update", "update/status", "replies")
        }
        self.rng = random.Random(f"{cfg.seed}:{device_id}")
        self.profile = telemetry.profile_for(self.rng, hardware)
        target = layout.parse_target(cfg.pack)
        self.pack = {"name": target.name, "version": target.version}
        self.original_pack = dict(self.pack)
        self.gate = Gate(keys, device_id)
        self.outbox = telemetry.Outbox(cfg.max_records)
        self.interval = telemetry.Interval.fresh()
        self.counters = Counters()
        self.state = "offline"
        self.event_seq = 0
        self.installing: Order | None = None
        self.want_online = self.connected = self.ready = self.settled = False
        self.started = time.monotonic()
        self._next_tick = 0.0
        self._backoff_s = BACKOFF_MIN_S
        self._reconnect: Timer | None = None
        self._settle: Timer | None = None
        self._in_flight: dict[int, int] = {}  # broker ack mode: publish mid -> last seq of the batch
        self.client = self._make_client()

    # ------------------------------------------------------------ the MQTT client

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv5)
        client.connect_timeout = CONNECT_TIMEOUT_S  # paho's TCP connect blocks the one loop thread
        if self.cfg.password is not None:
            client.username_pw_set(self.id, self.cfg.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = lambda c, u, sock: self.loop.watch(sock, self)
        client.on_socket_close = lambda c, u, sock: self.loop.unwatch(sock)
        client.on_socket_register_write = lambda c, u, sock: self.loop.want_write(sock, True)
        client.on_socket_unregister_write = lambda c, u, sock: self.loop.want_write(sock, False)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s  # requests sent while away still arrive
        host, port = host_port(self.cfg.broker)
        client.connect_async(host, port, self.cfg.keepalive_s, clean_start=False, properties=props)
        return client

    def on_readable(self) -> None:
        self.client.loop_read()

    def on_writable(self) -> None:
        self.client.loop_write()

    def keepalive(self) -> None:
        """paho's pings and timeouts; the fleet calls this every few seconds."""
        if self.client.socket() is not None:
            self.client.loop_misc()

    # ------------------------------------------------------------ life cycle

    def boot(self) -> None:
        """The start of the simulated agent: a boot record, then metrics every interval."""
        self.started = time.monotonic()
        boot = {
            "event": "boot",
            "pack": dict(self.pack),
            "pack_error": None,
            "agent_version": self.cfg.agent_version,
            "last_update": None,
        }
        self.add_record("event", boot)
        self._next_tick = self.started + unit(self.cfg.seed, "phase", self.id) * self.cfg.interval_s
        self.loop.call_later(self._next_tick - time.monotonic(), self._tick)

    def go_online(self) -> None:
        self.want_online = True
        self.connect()

    def go_offline(self, mode: str = "kill") -> None:
        """``kill``: the connection just ends (the broker publishes the will); ``clean``: a
        fresh offline status, then DISCONNECT (the agent's clean stop)."""
        self.want_online = False
        if self._reconnect is not None:
            self._reconnect.cancel()
        sock = self.client.socket()
        if sock is None:
            return
        if mode == "clean" and self.connected:
            self.publish_status("offline")
            self.client.disconnect()
        else:
            with contextlib.suppress(OSError):
                _raw(sock).shutdown(socket.SHUT_RDWR)

    def connect(self) -> None:
        """Connect now if the device is meant to be online and has no connection yet."""
        self._reconnect = None
        if not self.want_online or self.client.socket() is not None:
            return  # already connected or connecting
        will = messages.status_document(
            self.id, "offline", self.pack, self.hardware, self.cfg.tags, self.cfg.agent_version
        )
        self.client.will_set(self.topics["status"], will, qos=1, retain=True)
        try:
            self.client.reconnect()
        except OSError as exc:  # refused, unreachable: try again later
            self.counters.connect_failures += 1
            log.debug("simulated_connect_failed", device=self.id, reason=str(exc)[:200])
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if not self.want_online or self._reconnect is not None:
            return
        delay = self._backoff_s * self.rng.uniform(0.5, 1.0)
        self._backoff_s = min(BACKOFF_MAX_S, self._backoff_s * 2)
        self._reconnect = self.loop.call_later(delay, self.connect)

    @_guarded
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.counters.connect_failures += 1
            log.warning("simulated_connect_refused", device=self.id, reason=str(reason))
            return  # the broker closes the connection: _on_disconnect schedules the retry
        self.connected, self._backoff_s = True, BACKOFF_MIN_S
        self.counters.connects += 1
        if self.counters.connects > 1:
            self.interval.reconnects += 1
        topics = [self.topics["update"]]
        if self.cfg.ack_mode == "fleet":
            topics.append(self.topics["telemetry/ack"])
        client.subscribe([(t, 1) for t in topics])
        self.publish_status()

    @_guarded
    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.ready = True
        self._settle = self.loop.call_later(self.cfg.resend_delay_s, self._resend)

    @_guarded
    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was_connected = self.connected
        self.connected = self.ready = self.settled = False
        if self._settle is not None:
            self._settle.cancel()
        if was_connected:
            self.counters.disconnects += 1
        if self.want_online:
            self._schedule_reconnect()

    # ------------------------------------------------------------ status

    def publish_status(self, state: str | None = None) -> None:
        """The retained status document (only while connected: every connect sends it anyway)."""
        state = state or ("updating" if self.installing else "online")
        if not self.connected:
            return
        doc = messages.status_document(
            self.id, state, self.pack, self.hardware, self.cfg.tags, self.cfg.agent_version
        )
        self.client.publish(self.topics["status"], doc, qos=1, retain=True)
        self.state = state
        self.counters.status_published += 1

    # ------------------------------------------------------------ telemetry

    def _tick(self) -> None:
        self._next_tick += self.cfg.interval_s
        self.loop.call_later(self._next_tick - time.monotonic(), self._tick)
        regressed = self.fate == REGRESS and self.pack != self.original_pack
        data = telemetry.metrics(
            self.rng,
            self.profile,
            pack=self.pack,
            agent_version=self.cfg.agent_version,
            uptime_s=time.monotonic() - self.started,
            slowdown=self.cfg.regress_factor if regressed else 1.0,
            interval=self.interval,
            spool=self.outbox.stats(),
        )
        self.interval = telemetry.Interval.fresh()
        self.add_record("metrics", data)
        if self.settled and self.cfg.ack_mode == "fleet" and self.outbox.stalled(self.cfg.ack_timeout_s):
            self.counters.records_resent += self.outbox.rewind()  # acks stopped: send again
            self.flush()

    def add_record(self, kind: str, data: Mapping[str, Any]) -> None:
        self.outbox.add(kind, data)
        self.counters.records_made += 1
        self.flush()

    def _resend(self) -> None:
        """Once the retained ack had time to arrive: everything above it goes out again."""
        self._settle = None
        if not self.connected:
            return
        self.counters.records_resent += self.outbox.rewind()
        self.settled = True
        self.flush()

    def flush(self) -> None:
        """Publish what this connection has not carried yet, in batches of at most 50."""
        if not (self.connected and self.settled):
            return
        while batch := self.outbox.unsent():
            payload = telemetry.encode_batch(self.id, batch)
            info = self.client.publish(self.topics["telemetry"], payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return
            self.outbox.mark_sent(batch[-1].seq)
            if self.cfg.ack_mode == "broker":
                self._in_flight[info.mid] = batch[-1].seq
            self.counters.telemetry_batches += 1
            self.counters.records_sent += len(batch)

    @_guarded
    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        """``broker`` ack mode: a batch the broker acknowledged is forgotten (agents before the
        fleet's ack did this)."""
        through = self._in_flight.pop(mid, None)
        if through is not None and not reason.is_failure:
            self.outbox.forget(through)

    def _on_ack(self, payload: bytes) -> None:
        try:
            through = telemetry.parse_ack(payload)
        except telemetry.BadAck as exc:
            self.counters.acks["invalid"] += 1
            log.warning("telemetry_ack_refused", device=self.id, reason=str(exc))
            return
        outcome = self.outbox.ack(through)
        self.counters.acks[outcome] += 1
        if outcome == "ahead":
            sent = self.outbox.max_sent
            log.warning("telemetry_ack_refused", device=self.id, through_seq=through, sent=sent)

    # ------------------------------------------------------------ inbound

    @_guarded
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics["telemetry/ack"]:
            self._on_ack(bytes(msg.payload))
        elif msg.topic == self.topics["update"]:
            self._on_instruction(msg)

    def _on_instruction(self, msg: mqtt.MQTTMessage) -> None:
        """The agent's order of checks: retained, reply topic, size, JSON, signature and
        replay, fields, target; then busy or started."""
        self.counters.instructions_received += 1
        response = getattr(msg.properties, "ResponseTopic", None)
        correlation = getattr(msg.properties, "CorrelationData", None)
        if msg.retain or (response is not None and self._refused_topic(response)):
            self._dropped()
            return
        reply = (response or self.topics["replies"], correlation)
        rid: str | None = None
        try:
            data = messages.decode_request(bytes(msg.payload))
            rid = messages.request_id(data)
            if response is None and data.get("reply_to") is not None:
                if self._refused_topic(data["reply_to"]):
                    self._dropped()
                    return
                reply = (str(data["reply_to"]), correlation)
            outcome = self._start(data, rid, reply)
        except Refusal as refusal:
            self.counters.instructions_refused += 1
            self.counters.refusals[refusal.code] += 1
            self._reply(reply, messages.error_reply(rid, refusal.code, refusal.message))
            outcome = refusal.code
        self.interval.requests[("update", outcome)] += 1

    def _refused_topic(self, topic: object) -> bool:
        return messages.reply_refusal(topic, self.cfg.reply_topics, self.cfg.topic_prefix) is not None

    def _dropped(self) -> None:
        self.counters.instructions_dropped += 1
        self.interval.reply_failures += 1

    def _reply(self, reply: tuple[str, bytes | None], body: Mapping[str, Any]) -> None:
        topic, correlation = reply
        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        self.client.publish(topic, messages.encode(body), qos=1, properties=props)

    # ------------------------------------------------------------ updates

    def _start(self, data: Mapping[str, Any], rid: str | None, reply: tuple[str, bytes | None]) -> str:
        order = parse_order(self.gate.check(data, "update").body)
        self.counters.rollouts[order.rollout_id] += 1
        if self.installing is not None:
            self.counters.instructions_busy += 1
            self._event(order, Step("rejected", None, "busy", "another update is in progress"))
            self._reply(reply, messages.final_reply(rid, result={"update": "busy"}))
            return "busy"
        self.counters.instructions_accepted += 1
        self.installing = order
        self.publish_status()
        self._reply(reply, messages.final_reply(rid, result={"update": "started"}))
        steps = plan(
            self.fate,
            order,
            self.pack["version"],
            self.hardware,
            self.cfg.download_steps,
            self.cfg.rollback_targets,
        )
        self._play(order, steps, 0)
        return "started"

    def _play(self, order: Order, steps: list[Step], index: int) -> None:
        step = steps[index]
        self._event(order, step)
        if index + 1 < len(steps):
            self.loop.call_later(self.cfg.step_delay_s, lambda: self._play(order, steps, index + 1))
        elif step.state == "activated":  # the first health probe passes: the new pack serves
            self.loop.call_later(self.cfg.step_delay_s, lambda: self._finish(order, step, adopt=True))
        else:
            self._finish(order, step, adopt=False)

    def _finish(self, order: Order, last: Step, adopt: bool) -> None:
        if adopt:
            self.pack = {"name": order.name, "version": order.version}
        self.installing = None
        self.counters.outcomes[last.state] += 1
        self.publish_status()

    def _event(self, order: Order, step: Step) -> None:
        """An update event (published even while disconnected: paho keeps it for the session)
        and, for a state change, the telemetry event record the agent spools."""
        self.event_seq += 1
        body = {
            "v": 1,
            "rollout_id": order.rollout_id,
            "target": order.target,
            "seq": self.event_seq,
            "state": step.state,
            "percent": step.percent,
            "reason_code": step.reason_code,
            "reason": step.reason,
            "ts": time.time(),
        }
        self.client.publish(self.topics["update/status"], json.dumps(body).encode(), qos=1)
        self.counters.events_sent += 1
        if step.state != "downloading":
            record = {
                "event": "update",
                "state": step.state,
                "target": order.target,
                "rollout_id": order.rollout_id,
                "reason_code": step.reason_code,
            }
            self.add_record("event", record)

    # ------------------------------------------------------------ inspection

    def view(self) -> DeviceView:
        return DeviceView(
            id=self.id,
            fate=self.fate,
            hardware=self.hardware,
            connected=self.connected,
            ready=self.ready,
            want_online=self.want_online,
            state=self.state if self.connected else "offline",
            pack=dict(self.pack),
            installing=self.installing.target if self.installing else None,
            regressed=self.fate == REGRESS and self.pack != self.original_pack,
            acked=self.outbox.acked,
            backlog=len(self.outbox.records),
            next_seq=self.outbox.next_seq,
            event_seq=self.event_seq,
            counters=self.counters.copy(),
        )


def _raw(sock: object) -> socket.socket:
    """paho hands out a plain socket here (the simulator has no TLS or websockets)."""
    assert isinstance(sock, socket.socket), type(sock)
    return sock
