"""Operator-side MQTT client: send one request, stream its chunks, return the final reply.

Used by the ``edge-agent query/read/cmd`` commands, the demo and the tests. MQTT 5 uses
a response topic and correlation data; MQTT 3.1.1 puts ``reply_to`` in the payload.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Small request/reply messages: Nagle plus delayed ACKs would add ~40 ms each way."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ClientError(Exception):
    """The broker could not be reached, or no reply came in time."""


class RequestClient:
    def __init__(
        self,
        url: str,
        device_id: str,
        *,
        topic_root: str = "edge/{device_id}",
        protocol: str = "5",
        client: str = "operator",
        username: str | None = None,
        password: str | None = None,
        persistent: bool = False,
    ) -> None:
        self.root = topic_root.replace("{device_id}", device_id)
        self.v5 = protocol == "5"
        self.client_name = client
        self.reply_topic = f"edge-ops/{client}/{uuid.uuid4().hex[:12]}"
        self._inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self._subscribed = threading.Event()
        self._pending: dict[str, list[dict[str, Any]]] = {}
        cid = f"{client}-{uuid.uuid4().hex[:8]}"
        self.persistent = persistent
        if self.v5:
            self._mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        else:
            self._mqtt = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=cid,
                protocol=mqtt.MQTTv311,
                clean_session=not persistent,
            )
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_socket_open = _no_delay
        if username:
            self._mqtt.username_pw_set(username, password)
        self._mqtt.on_message = self._on_message
        self._mqtt.on_subscribe = lambda *a: self._subscribed.set()
        parsed = urlparse(url)
        self._host, self._port = parsed.hostname or "127.0.0.1", parsed.port or 1883

    def __enter__(self) -> RequestClient:
        kwargs: dict[str, Any] = {}
        if self.v5 and self.persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 300
            kwargs = {"clean_start": False, "properties": props}
        try:
            self._mqtt.connect(self._host, self._port, keepalive=30, **kwargs)
        except OSError as exc:
            raise ClientError(f"cannot reach the broker at {self._host}:{self._port}: {exc}") from None
        self._mqtt.loop_start()
        if not self._subscribed.wait(10):
            raise ClientError("the broker did not acknowledge the reply subscription")
        return self

    def __exit__(self, *exc: object) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        """(Re)subscribe on every connect: a restarted broker may have lost the session."""
        client.subscribe(self.reply_topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._inbox.put(json.loads(msg.payload))
        except (ValueError, UnicodeDecodeError):
            self._inbox.put({"type": "garbage", "raw": msg.payload[:100].decode("utf-8", "replace")})

    def send(self, kind: str, body: dict[str, Any], confirm: bool = True) -> str:
        """Publish a request on ``{root}/{kind}``; returns its id. ``confirm`` waits for
        the broker's PUBACK (off for bursts)."""
        payload = {"v": 1, "id": uuid.uuid4().hex[:16], **body}
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = payload["id"].encode()
            props.UserProperty = [("client", self.client_name)]
        else:
            payload.update(reply_to=self.reply_topic, client=self.client_name)
        info = self._mqtt.publish(f"{self.root}/{kind}", json.dumps(payload), qos=1, properties=props)
        if confirm:
            info.wait_for_publish(10)
        return str(payload["id"])

    def wait(
        self, rid: str, timeout_s: float, on_chunk: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Chunks go to ``on_chunk``; returns the final or error reply for ``rid``. Replies to
        other requests that arrive meanwhile are kept for their own ``wait``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for msg in self._pending.pop(rid, []):
                if msg.get("type") != "chunk":
                    return msg
                if on_chunk:
                    on_chunk(msg)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(f"no reply to {rid} within {timeout_s:g}s")
            try:
                msg = self._inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self._pending.setdefault(str(msg.get("id")), []).append(msg)

    def request(
        self,
        kind: str,
        body: dict[str, Any],
        timeout_s: float = 120.0,
        on_chunk: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        return self.wait(self.send(kind, body), timeout_s, on_chunk)
