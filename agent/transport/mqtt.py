"""paho-mqtt 2.x wrapper: connect, reconnect with backoff and jitter, publish, hand messages over.

paho's callbacks run on paho's network thread; here they do nothing but put an
:class:`Inbound` on a queue (or flip a flag), so a slow handler can never stall
keepalives. Subscriptions are renewed on every connect; the status birth document is
republished on every connect; the last will marks the device offline.
"""

from __future__ import annotations

import contextlib
import queue
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig

log = structlog.get_logger("edge_agent.mqtt")


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: dict[str, str] = field(default_factory=dict)
    v5: bool = True


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
    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        subscriptions: list[str],
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.v5 = cfg.protocol == "5"
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.connected = threading.Event()
        self.connects = 0
        self._subscriptions = list(subscriptions)
        self._on_connect_hook = on_connect
        self._backoff = Backoff(cfg.reconnect.min_s, cfg.reconnect.max_s)
        self._client = self._make_client(client_id, will)

    # ------------------------------------------------------------ setup

    def _make_client(self, client_id: str, will: Will | None) -> mqtt.Client:
        if self.v5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False
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
        client.on_message = self._handle_message
        client.on_socket_open = self._handle_socket_open
        return client

    @staticmethod
    def _set_delay(client: mqtt.Client, seconds: float) -> None:
        """Fix paho's next reconnect wait to ``seconds`` (our backoff decides, with jitter);
        paho sleeps on floats although its signature says int."""
        client.reconnect_delay_set(seconds, seconds)  # type: ignore[arg-type]

    def start(self) -> None:
        """Connect in the background; paho's loop thread reconnects on its own."""
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.session_expiry_s
            kwargs = {"clean_start": False, "properties": props}
        self._client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s, **kwargs)
        self._client.loop_start()

    def stop(self, last: tuple[str, bytes] | None = None, timeout_s: float = 3.0) -> None:
        """Publish ``last`` (retained, e.g. the offline status), then disconnect."""
        if last is not None and self.connected.is_set():
            info = self._client.publish(last[0], last[1], qos=1, retain=True)
            info.wait_for_publish(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    # ------------------------------------------------------------ paho callbacks

    def _handle_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError):  # not TCP (websockets, unix): nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt_connect_refused", reason=str(reason))
            return
        self.connects += 1
        self._backoff.reset()
        self._set_delay(client, self.cfg.reconnect.min_s)
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self.connected.set()
        log.info(
            "mqtt_connected",
            host=self.cfg.host,
            port=self.cfg.port,
            connects=self.connects,
            session_present=bool(getattr(flags, "session_present", False)),
        )
        if self._on_connect_hook:
            self._on_connect_hook()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        delay = self._backoff.next_delay()
        self._set_delay(client, delay)
        log.warning("mqtt_disconnected", reason=str(reason), retry_in_s=round(delay, 2))

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = {}
        response, corr = None, None
        if props is not None:
            response = getattr(props, "ResponseTopic", None)
            corr = getattr(props, "CorrelationData", None)
            user = dict(getattr(props, "UserProperty", []) or [])
        self.inbox.put(Inbound(msg.topic, bytes(msg.payload), response, corr, user, self.v5))

    # ------------------------------------------------------------ publishing

    def publish(
        self, topic: str, payload: bytes, retain: bool = False, correlation_data: bytes | None = None
    ) -> None:
        """QoS 1 publish; paho queues it while disconnected and sends it on reconnect."""
        props = None
        if self.v5 and correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation_data
        self._client.publish(topic, payload, qos=1, retain=retain, properties=props)

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)
