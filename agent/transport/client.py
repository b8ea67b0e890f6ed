"""Operator-side requests: send one request, stream its chunks, return the final reply.

Used by ``edge-agent query|read|cmd``, ``edge-fleet update send``, the demo, the benchmarks
and the tests. It owns no MQTT connection of its own: it rides on :class:`MqttTransport`,
the daemon's wrapper, so reconnects, TLS, credentials and TCP tuning behave the same on
both ends. MQTT 5 uses a response topic and correlation data; MQTT 3.1.1 puts
``reply_to`` in the payload.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from agent.config import MqttConfig
from agent.transport.mqtt import Inbound, MqttError, MqttTransport

ClientError = MqttError
"""The name operator code catches: the broker is unreachable or refused us, or no reply came."""

CONNECT_TIMEOUT_S = 10.0
CONFIRM_TIMEOUT_S = 10.0
OPERATOR_SESSION_S = 300  # a persistent operator session outlives a broker restart, not a day


class RequestClient:
    """Requests to one device. Use it as a context manager: entering connects (and raises
    :class:`ClientError` at once when the broker cannot be reached), leaving disconnects.

    ``persistent`` keeps the session, and so the replies, across a broker restart.
    ``ca_file`` (or an ``mqtts://`` URL) turns TLS on; ``cert_file``/``key_file`` are the
    client certificate for brokers that require one.

    ``watch_status`` also subscribes to the device's retained status document
    (docs/protocol.md): :meth:`device_status` reads it before a request, so an operator learns
    at once that a device is offline or unknown instead of waiting out the timeout, and
    :meth:`wait` stops when the device goes offline (its last will) while a reply is awaited.
    """

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
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        watch_status: bool = False,
    ) -> None:
        self.root = topic_root.replace("{device_id}", device_id)
        self.device_id = device_id
        self.status_topic = f"{self.root}/status"
        self.status: dict[str, Any] | None = None  # the latest status document seen
        self.v5 = protocol == "5"
        self.client_name = client
        # under the broker login when there is one: an ACL by identity lets each user read
        # only edge-ops/<username>/# (edge-fleet broker acl)
        self.reply_topic = f"edge-ops/{username or client}/{uuid.uuid4().hex[:12]}"
        self.persistent = persistent
        cfg = MqttConfig(
            url=url,
            protocol=protocol,
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            session_expiry_s=OPERATOR_SESSION_S,
        )
        cid = f"{client}-{uuid.uuid4().hex[:8]}"
        topics = [self.reply_topic, *([self.status_topic] if watch_status else [])]
        self.transport = MqttTransport(cfg, cid, topics, persistent=persistent)
        self._pending: dict[str, list[dict[str, Any]]] = {}

    def __enter__(self) -> RequestClient:
        self.transport.connect(CONNECT_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.transport.stop()

    # ------------------------------------------------------------ requests

    def send(self, kind: str, body: dict[str, Any], confirm: bool = True) -> str:
        """Publish a request on ``{root}/{kind}``; returns its id. ``confirm`` waits for
        the broker's PUBACK (off for bursts)."""
        payload: dict[str, Any] = {"v": 1, "id": uuid.uuid4().hex[:16], **body}
        rid = str(payload["id"])  # a body may bring its own id
        if not self.v5:
            payload.update(reply_to=self.reply_topic, client=self.client_name)
        self.transport.publish(  # the properties are MQTT 5 only; the transport drops them for 3.1.1
            f"{self.root}/{kind}",
            json.dumps(payload),
            correlation_data=rid.encode(),
            response_topic=self.reply_topic,
            user_properties={"client": self.client_name},
            wait_s=CONFIRM_TIMEOUT_S if confirm else None,
        )
        return rid

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
                raise ClientError(f"no reply to {rid} within {timeout_s:g}s", "no_reply")
            try:
                inbound = self.transport.inbox.get(timeout=left)
            except queue.Empty:
                continue
            self._take(inbound)
            if inbound.topic == self.status_topic and not inbound.retain and _offline(self.status):
                # a live offline document is the last will (or a clean stop): no reply will come
                raise ClientError(
                    f"device {self.device_id!r} went offline while {rid} was waiting for its reply",
                    "device_offline",
                )

    def device_status(self, wait_s: float) -> dict[str, Any] | None:
        """The device's status document (with ``watch_status``), or None when none arrived
        within ``wait_s``: the broker has no retained status for that device id, so no agent
        by that name has ever connected to it (a misspelt id, another broker or topic root).
        A broker hands a retained message right after the SUBACK that :meth:`__enter__`
        waited for, so a short wait is enough."""
        deadline = time.monotonic() + wait_s
        while self.status is None:
            try:
                self._take(self.transport.inbox.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return None
        return self.status

    def _take(self, inbound: Inbound) -> None:
        """File one message: the status document, or a reply kept under its request id."""
        msg = _decode(inbound.payload)
        if inbound.topic == self.status_topic:
            if msg.get("type") != "garbage":
                self.status = msg
            return
        self._pending.setdefault(str(msg.get("id")), []).append(msg)

    def request(
        self,
        kind: str,
        body: dict[str, Any],
        timeout_s: float = 120.0,
        on_chunk: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        return self.wait(self.send(kind, body), timeout_s, on_chunk)

    # ------------------------------------------------------------ raw messages

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Mapping[str, str] | None = None,
        confirm: bool = True,
    ) -> None:
        """Publish ``payload`` as it is to any topic (QoS 1): a sensor reading, or a request
        that :meth:`send` would not build (malformed, foreign correlation data). The MQTT 5
        properties are dropped under 3.1.1. ``confirm`` waits for the broker's PUBACK."""
        self.transport.publish(
            topic,
            payload,
            response_topic=response_topic,
            correlation_data=correlation_data,
            user_properties=user_properties,
            wait_s=CONFIRM_TIMEOUT_S if confirm else None,
        )

    def next_reply(self, timeout_s: float) -> Inbound:
        """The next message on :attr:`reply_topic` as it came off the wire (payload bytes,
        MQTT 5 properties, retain flag), for callers that check the envelope itself. Replies
        :meth:`wait` has already taken are not returned again."""
        try:
            return self.transport.inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise ClientError(f"nothing on {self.reply_topic} within {timeout_s:g}s", "no_reply") from None


def _offline(status: dict[str, Any] | None) -> bool:
    return status is not None and status.get("state") == "offline"


def _decode(payload: bytes) -> dict[str, Any]:
    """A reply as a dict; anything that is not a JSON object is handed on as ``garbage``
    (with no id, so no ``wait`` takes it for its reply)."""
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        msg = None
    if not isinstance(msg, dict):
        return {"type": "garbage", "raw": payload[:100].decode("utf-8", "replace")}
    return msg
