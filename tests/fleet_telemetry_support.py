"""Helpers for tests/test_fleet_telemetry.py: payloads in the documented format, a QoS 1
publisher, and `edge-fleet ingest` workers run as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent


def metrics(seq: int, ts: float | None = None) -> dict[str, Any]:
    return {"seq": seq, "ts": time.time() if ts is None else ts, "kind": "metrics", "data": {"uptime_s": seq}}


def dropped(seq: int, first: int, last: int) -> dict[str, Any]:
    data = {"from_seq": first, "to_seq": last, "count": last - first + 1, "reason": "spool_full"}
    return {"seq": seq, "ts": time.time(), "kind": "dropped", "data": data}


def update_event(seq: int, state: str, target: str = "tiny@0.0.2") -> dict[str, Any]:
    data = {"event": "update", "state": state, "target": target, "reason_code": None}
    return {"seq": seq, "ts": time.time(), "kind": "event", "data": data}


def telemetry(device: str, records: list[dict[str, Any]]) -> bytes:
    return json.dumps({"v": 1, "device": device, "records": records}).encode()


def status(
    device: str,
    state: str,
    pack: tuple[str, str] | None = ("tiny", "0.0.1"),
    hardware: list[str] | None = None,
    tags: list[str] | None = None,
) -> bytes:
    """A status document as the agent publishes it; ``hardware`` and ``tags`` only when given
    (an older agent sends neither)."""
    doc: dict[str, Any] = {
        "v": 1,
        "state": state,
        "device_id": device,
        "pack": {"name": pack[0], "version": pack[1]} if pack else None,
        "capabilities": ["query", "read", "cmd", "stream"],
        "agent_version": "0.1.0",
        "ts": time.time(),
    }
    if hardware is not None:
        doc["hardware"] = hardware
    if tags is not None:
        doc["tags"] = tags
    return json.dumps(doc).encode()


def wait_until(check: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class Publisher:
    """A device-side MQTT 5 client: every publish QoS 1 and acknowledged by the broker."""

    def __init__(self, port: int, will: tuple[str, bytes] | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"broker did not acknowledge {topic}"

    def vanish(self) -> None:
        """Drop the connection without DISCONNECT, as a crash or power cut does: the broker
        then publishes the last will."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert sock is not None
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class WorkerProcess:
    """``python -m fleet.cli ingest ...`` with its JSON log lines collected from stderr."""

    def __init__(self, broker_url: str, db: str, group: str, client_id: str) -> None:
        self.argv = [
            sys.executable, "-m", "fleet.cli", "ingest", "--broker", broker_url, "--db", db,
            "--group", group, "--client-id", client_id, "--stats-every", "0.5",
        ]  # fmt: skip
        self.logs: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=os.environ.copy()
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.logs.append(json.loads(line))
            except ValueError:
                self.logs.append({"event": "raw", "line": line.decode(errors="replace")})

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in list(self.logs) if e.get("event") == name]

    def wait_subscribed(self, timeout_s: float = 20.0) -> None:
        wait_until(lambda: bool(self.events("ingest_subscribed")) or self.proc.poll() is not None, timeout_s)
        assert self.proc.poll() is None, f"worker exited: {self.logs[-5:]}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> dict[str, Any]:
        """SIGTERM; returns the counters the worker logged as it stopped."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0, self.logs[-5:]
        self._reader.join(5)
        stopped = self.events("ingest_stopped")
        assert stopped, self.logs[-5:]
        return stopped[-1]
