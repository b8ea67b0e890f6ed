"""paho-mqtt 2.x wrapper, the only module that imports paho: the daemon and operator clients use it.

paho's callbacks run on paho's network thread; here they do nothing but put an
:class:`Inbound` on a queue (or flip a flag), so a slow handler can never stall
keepalives. Subscriptions are renewed on every connect (a broker that restarted without
persistence has forgotten them); the daemon republishes its status birth document on every
connect through ``on_connect``, and its last will marks the device offline.

Two roles share the wrapper, so reconnect, TLS, credentials and TCP tuning are written once:

- the daemon keeps a persistent session and connects in the background (:meth:`start`): it
  must come up before its broker does and never give up;
- an operator client (``RequestClient``, the fleet's sender) usually wants a clean session
  (``persistent=False``) and to fail fast: :meth:`connect` returns only once the broker has
  acknowledged the connection and every subscription, or raises :class:`MqttError`.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig

log = structlog.get_logger("edge_agent.mqtt")


class MqttError(Exception):
    """Talking to the broker failed. ``code`` is stable, for CLIs and scripts to match:
    ``unreachable`` (no connection, or no acknowledgement in time), ``refused`` (the broker
    turned the connection or a subscription down: credentials, ACLs) and ``no_reply`` (the
    broker took a request but no answer came in time)."""

    def __init__(self, message: str, code: str = "unreachable") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: dict[str, str] = field(default_factory=dict)
    v5: bool = True
    retain: bool = False


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes


class Backoff:
    """Exponential backoff with full jitter in [delay/2, delay]."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s, self.max_s = min_s, max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = min(self.max_s, self.min_s * (2**self.attempt))
        self.attempt += 1
        return float(delay * self._rng.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.attempt = 0


class MqttTransport:
    """One MQTT connection: QoS 1 publishes, subscriptions renewed on every connect, and
    every message received put on :attr:`inbox`.

    ``persistent``: the broker keeps the session (subscriptions and QoS 1 messages queued
    while disconnected) for ``cfg.session_expiry_s`` (MQTT 5) or until a clean connect
    (3.1.1). The daemon needs that; a one-shot operator command does not.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        subscriptions: Sequence[str],
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        *,
        persistent: bool = True,
        max_packet_bytes: int | None = None,
        inbox_size: int = 0,
    ) -> None:
        self.cfg = cfg
        self.v5 = cfg.protocol == "5"
        self.persistent = persistent
        # MQTT 5 asks the broker to send nothing larger (it drops such messages for us);
        # the inbox bound caps what a flood can queue. Both 0/None: unbounded (operator side).
        self.max_packet_bytes = max_packet_bytes
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=inbox_size)
        self.dropped = 0
        self.publish_refused = 0  # PUBACKs with a failure reason (an ACL denial, a `$` topic)
        self._refused_mids: collections.deque[int] = collections.deque(maxlen=1000)
        self._in_flight: dict[int, str] = {}
        self._pub_lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # this connection's subscriptions are acknowledged
        self.connects = 0
        self._subscriptions = list(subscriptions)
        self._on_connect_hook = on_connect
        self._backoff = Backoff(cfg.reconnect.min_s, cfg.reconnect.max_s)
        self._connack = threading.Event()  # the broker answered a CONNECT, accepting or not
        self._refused: str | None = None
        self._unacked: set[int] = set()  # SUBSCRIBE packet ids of this connection
        self._closing = False
        self._connect_failures = 0  # attempts in a row that did not reach the broker
        self._client = self._make_client(client_id, will)

    # ------------------------------------------------------------ setup

    def _make_client(self, client_id: str, will: Will | None) -> mqtt.Client:
        if self.v5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv311,
                clean_session=not self.persistent,
            )
        if will is not None:
            client.will_set(will.topic, will.payload, qos=1, retain=True)
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls:
            client.tls_set(ca_certs=self.cfg.ca_file, certfile=self.cfg.cert_file, keyfile=self.cfg.key_file)
        self._set_delay(client, self.cfg.reconnect.min_s)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        client.on_socket_open = self._handle_socket_open
        return client

    def set_will(self, will: Will) -> None:
        """Replace the last will; the broker takes it at the next CONNECT (MQTT cannot change
        the will of a live connection), so set it before :meth:`start` for the first one."""
        self._client.will_set(will.topic, will.payload, qos=1, retain=True)

    @staticmethod
    def _set_delay(client: mqtt.Client, seconds: float) -> None:
        """Fix paho's next reconnect wait to ``seconds`` (our backoff decides, with jitter);
        paho sleeps on floats although its signature says int."""
        client.reconnect_delay_set(seconds, seconds)  # type: ignore[arg-type]

    def _session_args(self) -> dict[str, Any]:
        """CONNECT arguments: MQTT 5 asks for the session to outlive the connection only
        when ``persistent`` (3.1.1 said so in the client's ``clean_session``)."""
        if not self.v5 or not (self.persistent or self.max_packet_bytes):
            return {}
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.max_packet_bytes:
            props.MaximumPacketSize = self.max_packet_bytes
        if not self.persistent:
            return {"properties": props}
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        return {"clean_start": False, "properties": props}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; paho's loop thread reconnects on its own."""
        self._client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s, **self._session_args())
        self._client.loop_start()

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect now and return once the broker accepted the connection and acknowledged
        every subscription (a request sent earlier could be answered before its reply topic
        exists); raise :class:`MqttError` instead of retrying in the background."""
        try:
            self._client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive_s, **self._session_args())
        except OSError as exc:  # refused, unresolvable, TLS handshake (ssl.SSLError is an OSError)
            raise MqttError(f"cannot reach the broker at {self._where()}: {exc}") from None
        self._client.loop_start()
        try:
            self._await_ready(time.monotonic() + timeout_s)
        except MqttError:
            self.stop()
            raise

    def _await_ready(self, deadline: float) -> None:
        if not self._connack.wait(max(0.0, deadline - time.monotonic())):
            raise MqttError(f"the broker at {self._where()} did not answer the connection")
        if self._refused is not None:
            why = f"the broker at {self._where()} refused the connection: {self._refused}"
            raise MqttError(why, "refused")
        if not self.subscribed.wait(max(0.0, deadline - time.monotonic())):
            raise MqttError(f"the broker at {self._where()} did not acknowledge the subscriptions")
        if self._refused is not None:
            raise MqttError(f"the broker refused a subscription: {self._refused}", "refused")

    def _where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def stop(self, last: tuple[str, bytes] | None = None, timeout_s: float = 3.0) -> None:
        """Publish ``last`` (retained, e.g. the offline status), then disconnect. From here on
        a lost connection is part of stopping: logged at info, never retried."""
        self._closing = True
        if last is not None and self.connected.is_set():
            info = self._client.publish(last[0], last[1], qos=1, retain=True)
            info.wait_for_publish(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connect_failures(self) -> int:
        """Attempts in a row that did not reach the broker (0 once connected)."""
        return self._connect_failures

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)

    # ------------------------------------------------------------ paho callbacks

    def _handle_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """Small request/reply messages: Nagle plus delayed ACKs would add ~40 ms each way."""
        with contextlib.suppress(OSError):  # not TCP (websockets, unix): nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt_connect_refused", reason=str(reason))
            self._refused = str(reason)
            self._connack.set()
            return
        self._refused = None
        self.connects += 1
        self._connect_failures = 0
        self._backoff.reset()
        self._set_delay(client, self.cfg.reconnect.min_s)
        self._subscribe_all(client)
        self.connected.set()
        self._connack.set()
        log.info(
            "mqtt_connected",
            host=self.cfg.host,
            port=self.cfg.port,
            connects=self.connects,
            session_present=bool(getattr(flags, "session_present", False)),
        )
        if self._on_connect_hook:
            self._on_connect_hook()

    def _subscribe_all(self, client: mqtt.Client) -> None:
        """One SUBSCRIBE per topic, as before; :attr:`subscribed` is set when all are acked.
        The SUBACKs arrive on this same network thread, so none can beat the bookkeeping."""
        self.subscribed.clear()
        mids = (client.subscribe(topic, qos=1)[1] for topic in self._subscriptions)
        self._unacked = {mid for mid in mids if mid is not None}  # None: the connection just dropped
        if not self._unacked:
            self.subscribed.set()

    def _handle_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], props: Any
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.warning("mqtt_subscribe_refused", reasons=refused)
            self._refused = ", ".join(refused)
        self._unacked.discard(mid)
        if not self._unacked:
            self.subscribed.set()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if self._closing:
            log.info("mqtt_closed", reason=str(reason))
            return
        delay = self._backoff.next_delay()
        self._set_delay(client, delay)
        log.warning("mqtt_disconnected", reason=str(reason), retry_in_s=round(delay, 2))

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """The broker could not be reached (refused, unresolvable, timed out) and paho will try
        again. The first failure in a row is a warning, so a wrong address or a stopped broker
        shows in the log at once; the rest are debug (the count goes on), with a growing wait."""
        if self._closing:
            return
        self._connect_failures += 1
        delay = self._backoff.next_delay()
        self._set_delay(client, delay)
        fields = {"broker": self._where(), "attempts": self._connect_failures, "retry_in_s": round(delay, 2)}
        if self._connect_failures == 1:
            log.warning("mqtt_connect_failed", **fields, hint="is the broker running and reachable?")
        else:
            log.debug("mqtt_connect_failed", **fields)

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        """MQTT 5 tells a refused publish apart (PUBACK reason >= 0x80): seen and counted,
        never taken for delivered. (3.1.1 brokers drop such publishes silently.)"""
        with self._pub_lock:
            topic = self._in_flight.pop(mid, None)
        if getattr(reason, "is_failure", False):
            self.publish_refused += 1
            self._refused_mids.append(mid)  # a waiting publish() raises instead of returning
            log.warning("mqtt_publish_refused", topic=repr(topic)[:200], reason=str(reason))

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = {}
        response, corr = None, None
        if props is not None:
            response = getattr(props, "ResponseTopic", None)
            corr = getattr(props, "CorrelationData", None)
            user = dict(getattr(props, "UserProperty", []) or [])
        try:
            inbound = Inbound(msg.topic, bytes(msg.payload), response, corr, user, self.v5, bool(msg.retain))
            self.inbox.put_nowait(inbound)
        except queue.Full:  # bounded: a flood costs dropped messages (counted), never memory
            self.dropped += 1
        except Exception:  # e.g. a topic that is not UTF-8: never let paho's thread die
            self.dropped += 1
            log.warning("mqtt_message_unreadable", dropped=self.dropped)

    # ------------------------------------------------------------ publishing

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        retain: bool = False,
        correlation_data: bytes | None = None,
        *,
        response_topic: str | None = None,
        user_properties: Mapping[str, str] | None = None,
        wait_s: float | None = None,
    ) -> None:
        """QoS 1 publish; paho queues it while disconnected and sends it on reconnect.

        The MQTT 5 properties are dropped under 3.1.1, which has none (3.1.1 requesters put
        ``reply_to`` and ``client`` in the payload). ``wait_s``: return only once the broker
        acknowledged it (PUBACK), else raise :class:`MqttError`; ``None`` does not wait, for
        bursts and for the daemon, whose replies must not block its dispatcher.
        """
        props = self._publish_properties(response_topic, correlation_data, user_properties)
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        with self._pub_lock:
            self._in_flight[info.mid] = topic
            while len(self._in_flight) > 10_000:  # unacknowledged forever: forget the oldest
                self._in_flight.pop(next(iter(self._in_flight)))
        if wait_s is not None:
            self._await_puback(info, topic, wait_s)

    def _publish_properties(
        self, response_topic: str | None, correlation_data: bytes | None, user: Mapping[str, str] | None
    ) -> Properties | None:
        if not self.v5 or (response_topic is None and correlation_data is None and not user):
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        if user:
            props.UserProperty = list(user.items())
        return props

    def _await_puback(self, info: mqtt.MQTTMessageInfo, topic: str, wait_s: float) -> None:
        try:
            info.wait_for_publish(wait_s)
        except (RuntimeError, ValueError) as exc:  # not connected, or paho's queue is full
            raise MqttError(f"publish to {topic} failed: {exc}") from None
        if not info.is_published():
            raise MqttError(f"the broker did not acknowledge a publish to {topic} within {wait_s:g}s")
        if info.mid in self._refused_mids:  # paho runs on_publish before it marks the publish done
            raise MqttError(f"the broker refused a publish to {topic} (PUBACK with a failure reason)")
