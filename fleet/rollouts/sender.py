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
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from fleet.telemetry.ingest import IngestConfig
from model_packs import instructions

log = structlog.get_logger("fleet.rollouts.sender")


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key

    def update(self, device: str, rollout_id: str, target: str) -> str:
        """The JSON envelope of one signed update instruction for ``device``."""
        fields = {"v": 1, "id": uuid.uuid4().hex[:16], "rollout_id": rollout_id, "target": target}
        return json.dumps(instructions.sign(self.key, "update", device, fields), separators=(",", ":"))


class Publisher:
    """One MQTT 5 client (clean start: nothing to resume; what was not acknowledged is
    published again from the store). Connects in the background and reconnects on its own."""

    def __init__(self, cfg: IngestConfig, client_id: str) -> None:
        self.cfg = cfg
        self.connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if cfg.username:
            self._client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            self._client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

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
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()

    def publish(self, items: Sequence[tuple[str, str]], timeout_s: float = 30.0) -> list[bool]:
        """QoS 1 each; True where the broker acknowledged it within ``timeout_s``."""
        if not items or not self.connected.wait(min(timeout_s, 5.0)):
            return [False] * len(items)
        infos = [self._client.publish(topic, payload.encode(), qos=1) for topic, payload in items]
        done, deadline = [], time.monotonic() + timeout_s
        for info in infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                done.append(info.is_published())
            except (RuntimeError, ValueError):  # not queued: the connection went away
                done.append(False)
        return done
