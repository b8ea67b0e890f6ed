"""The rollout driver's broker side: signs each device's instruction and publishes it.

Signing is separate from publishing because the driver commits the signed envelope to the
store before it publishes (so a driver that takes over republishes the same bytes rather than
signing a second instruction). Publishing waits for every PUBACK: an instruction counts as
published only once the broker has it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.telemetry.ingest import IngestConfig
from model_packs import instructions

log = structlog.get_logger("fleet.rollouts.sender")
MAX_REPLY_BYTES = 4096
MAX_PENDING_REFUSALS = 100_000


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key

    def update(self, device: str, rollout_id: str, target: str) -> str:
        """The JSON envelope of one signed update instruction for ``device``."""
        fields = {"v": 1, "id": uuid.uuid4().hex[:16], "rollout_id": rollout_id, "target": target}
        return json.dumps(instructions.sign(self.key, "update", device, fields), separators=(",", ":"))


@dataclass(frozen=True)
class Refusal:
    """A device's error reply to one of this driver's instructions (``unauthorized``:
    it does not trust the signing key; ``wrong_device``; ``bad_request``; ...)."""

    rollout_id: str  # ends in ``.rollback`` for a rollback instruction
    device_id: str
    token: str  # the instruction's id, echoed: only its device (and the fleet) ever saw it
    code: str
    message: str


class Publisher:
    """One MQTT 5 client (clean start: nothing to resume; what was not acknowledged is
    published again from the store). Connects in the background and reconnects on its own.

    Each instruction names a response topic of this client's own (``edge-ops/USER/rollouts``:
    the agents' default ``replies.allowed_topics`` and the broker ACL's ``edge-ops/%u/#``) with
    the rollout and device as correlation data, so a device that refuses it is known at once
    (:meth:`refusals`) rather than after the response timeout. A reply is a hint, never the
    only signal: a driver that dies loses its replies and the timeout still applies.

    Any device may publish under ``edge-ops/`` (that is how it replies to operators), so a
    reply proves nothing by its topic: the correlation data carries the instruction's random
    id, which only that device received (the ACL keeps devices out of each other's trees), and
    the driver acts on a refusal only when that id is the one it sent that device."""

    def __init__(self, cfg: IngestConfig, client_id: str) -> None:
        self.cfg = cfg
        self.replies_topic = f"edge-ops/{cfg.username or client_id}/rollouts"
        self._refusals: list[Refusal] = []
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if cfg.username:
            self._client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            self._client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def start(self) -> None:
        self._client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s, clean_start=True)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("rollout_publisher_refused", reason=str(reason), broker=self.cfg.broker_url)
            return
        client.subscribe(self.replies_topic, qos=1)
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Keep error replies; finals (started, busy: an event follows) are not needed."""
        try:
            correlation = getattr(msg.properties, "CorrelationData", None)
            if not isinstance(correlation, bytes):
                return
            rollout_id, device, token = [*correlation.decode().split(" "), "", ""][:3]
            reply = json.loads(msg.payload[:MAX_REPLY_BYTES])
            if not isinstance(reply, dict) or reply.get("type") != "error":
                return
            found = Refusal(
                rollout_id, device, token, str(reply.get("code"))[:64], str(reply.get("message"))[:300]
            )
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return  # not one of ours, or not JSON: nothing to learn from it
        with self._lock:
            if len(self._refusals) < MAX_PENDING_REFUSALS:
                self._refusals.append(found)

    def refusals(self) -> list[Refusal]:
        """The refusals received since the last call."""
        with self._lock:
            found, self._refusals = self._refusals, []
        return found

    def publish(self, items: Sequence[tuple[str, str, str]], timeout_s: float = 30.0) -> list[bool]:
        """(topic, payload, correlation) each, QoS 1; True where the broker acknowledged it
        within ``timeout_s``. ``correlation``: ``"ROLLOUT_ID DEVICE_ID INSTRUCTION_ID"``, echoed
        in a reply."""
        if not items or not self.connected.wait(min(timeout_s, 5.0)):
            return [False] * len(items)
        infos = [
            self._client.publish(topic, payload.encode(), qos=1, properties=self._reply_to(correlation))
            for topic, payload, correlation in items
        ]
        done, deadline = [], time.monotonic() + timeout_s
        for info in infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                done.append(info.is_published())
            except (RuntimeError, ValueError):  # not queued: the connection went away
                done.append(False)
        return done

    def _reply_to(self, correlation: str) -> Properties:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.replies_topic
        props.CorrelationData = correlation.encode()
        return props
