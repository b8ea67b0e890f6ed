"""A fleet service's rollout half, in-process and real: a TelemetryStore, an ingest worker
on a real broker, the rollout driver with the real publisher and signer, and the FastAPI app
(TestClient) to start and steer rollouts. Simulated devices (fleet/simulator) and real agents
share the broker under one topic prefix per test."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from fleet.api.app import create_app
from fleet.api.auth import TokenFile, add_token
from fleet.operators import signing_key
from fleet.rollouts.driver import RolloutDriver
from fleet.rollouts.sender import Publisher, Signer
from fleet.rollouts.store import RolloutStore
from fleet.simulator.config import Shares, SimConfig
from fleet.telemetry.ingest import IngestConfig, IngestWorker
from fleet.telemetry.store import TelemetryStore
from tests.operators import default_operator

ENDED = ("completed", "aborted", "rolled_back", "halted")


def sim_config(broker_url: str, prefix: str, devices: int, **overrides: Any) -> SimConfig:
    """Simulated devices on ``tiny@0.0.1`` that trust the default operator, fast timings."""
    fields: dict[str, Any] = {
        "broker": broker_url,
        "devices": devices,
        "id_prefix": f"{prefix}-",
        "topic_prefix": prefix,
        "operator_keys": (default_operator().pub,),
        "interval_s": 0.3,
        "step_delay_s": 0.05,
        "pack": "tiny@0.0.1",
        "rollback_targets": ("tiny@0.0.1",),
        "shares": Shares(),
    }
    fields.update(overrides)
    return SimConfig(**fields)


class FleetService:
    """``start()`` a rollout through the API, ``wait()`` for its document to satisfy a test."""

    def __init__(self, broker_url: str, db: str, tmp: Path, prefix: str, *, lease_s: float = 3.0) -> None:
        self.prefix = prefix
        self.store = TelemetryStore.open(db)
        tag = uuid.uuid4().hex[:8]
        cfg = IngestConfig(broker_url, group=f"g{tag}", client_id=f"ingest-{tag}", topic_prefix=prefix)
        self.worker = IngestWorker(cfg, self.store)
        self.worker.start()
        assert self.worker.subscribed.wait(10), "the ingest worker did not subscribe"
        self.publisher = Publisher(cfg, f"driver-{tag}")
        self.publisher.start()
        self.rollouts = RolloutStore(self.store, lease_s)
        signer = Signer(signing_key(default_operator().private))
        self.driver = RolloutDriver(
            self.rollouts,
            signer,
            self.publisher.publish,
            self.publisher.refusals,
            f"driver-{tag}",
            prefix,
            0.2,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.driver.run, args=(self._stop,), daemon=True)
        self._thread.start()
        tokens = tmp / f"tokens-{tag}"
        self.admin = {"Authorization": f"Bearer {add_token(tokens, 'admin', 'tester')}"}
        self.client = TestClient(create_app(self.store, TokenFile(tokens)))

    def devices_known(self, ids: list[str], timeout_s: float = 30.0) -> None:
        """Until the registry has every one of ``ids`` (their retained status was ingested)."""
        wait_for(lambda: {d.device_id for d in self.store.devices(ids)} == set(ids), timeout_s, "registry")

    def start(self, **body: Any) -> str:
        r = self.client.post("/api/v1/rollouts", json={"target": "tiny@0.0.2", **body}, headers=self.admin)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def act(self, rollout_id: str, action: str) -> dict[str, Any]:
        r = self.client.post(f"/api/v1/rollouts/{rollout_id}/{action}", headers=self.admin)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def doc(self, rollout_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/api/v1/rollouts/{rollout_id}", headers=self.admin).json())

    def wait(
        self, rollout_id: str, done: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0
    ) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def check() -> bool:
            nonlocal found
            found = self.doc(rollout_id)
            return done(found)

        wait_for(check, timeout_s, lambda: f"rollout {rollout_id}: {found}")
        return found

    def device_states(self, rollout_id: str) -> dict[str, str]:
        return {d.device_id: d.state for d in self.rollouts.devices(rollout_id)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.publisher.stop()
        self.worker.stop()
        self.client.close()
        self.store.close()


def wait_for(check: Callable[[], bool], timeout_s: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s: {what() if callable(what) else what}")
        time.sleep(0.1)
