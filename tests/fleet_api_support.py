"""Helpers for tests/test_fleet_api.py: status documents and metrics records with the fields
the fleet API reads, a store filled in the documented format, and `edge-fleet service` run as
a real subprocess on a free port."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.localbroker import free_port
from fleet.telemetry.payloads import parse_status, parse_telemetry
from fleet.telemetry.store import TelemetryStore
from tests.fleet_telemetry_support import REPO, status, wait_until


def status_doc(
    device: str,
    state: str = "online",
    pack: tuple[str, str] | None = ("tiny", "0.0.1"),
    hardware: list[str] | None = None,
    tags: list[str] | None = None,
) -> bytes:
    return status(device, state, pack, hardware, tags)


def metrics_record(
    seq: int, ts: float, rss_mb: float, p95: float, ok: int = 10, failed: int = 0
) -> dict[str, Any]:
    data = {
        "pack": {"name": "tiny", "version": "0.0.1"},
        "uptime_s": seq * 60,
        "rss_mb": rss_mb,
        "queue_depth": 0,
        "requests": {"query": {"ok": ok, "timeout": failed}, "read": {"ok": 1}},
        "answers": {"count": ok, "latency_ms": {"p50": p95 / 2, "p95": p95}, "ttft_ms": None},
    }
    return {"seq": seq, "ts": ts, "kind": "metrics", "data": data}


def telemetry_doc(device: str, records: list[dict[str, Any]]) -> bytes:
    return json.dumps({"v": 1, "device": device, "records": records}).encode()


def put_status(store: TelemetryStore, device: str, **fields: Any) -> None:
    doc = parse_status(device, status_doc(device, **fields))
    assert doc is not None
    store.apply_status(doc, time.time())


def put_records(store: TelemetryStore, device: str, records: list[dict[str, Any]]) -> None:
    store.ingest(parse_telemetry(device, telemetry_doc(device, records)), time.time())


class ServiceProcess:
    """``python -m fleet.cli service ...`` with its JSON log lines collected from stderr."""

    def __init__(self, args: list[str], ca: Path | None = None) -> None:
        """``ca``: the service serves HTTPS (``--tls-cert``/``--tls-key`` in ``args``) under this CA."""
        self.port = free_port()
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        self.tls = ssl.create_default_context(cafile=str(ca)) if ca else None
        self.ingest = "--api-only" not in args
        argv = [sys.executable, "-m", "fleet.cli", "service", "--listen", f"127.0.0.1:{self.port}", *args]
        self.logs: list[str] = []
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=os.environ.copy()
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.logs.append(line.decode(errors="replace"))

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"service exited: {self.logs[-5:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1, context=self.tls) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(up, timeout_s, "the service to answer /healthz")
        if not self.ingest:
            return
        wait_until(
            lambda: any("ingest_subscribed" in line for line in self.logs), timeout_s, "ingest subscribed"
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def tokens_file(tmp: Path) -> tuple[Path, str, str]:
    """A token file with one read and one admin token, made by `edge-fleet token add`."""
    path = tmp / "tokens"
    read = cli("token", "add", "--role", "read", "--tokens", str(path), "--name", "ops")
    admin = cli("token", "add", "--role", "admin", "--tokens", str(path), "--name", "root")
    assert read.returncode == 0 and admin.returncode == 0, read.stderr + admin.stderr
    return path, read.stdout.strip(), admin.stdout.strip()
