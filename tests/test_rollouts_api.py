"""Rollouts through the real API and store (SQLite file and a throwaway PostgreSQL schema):
creation and its error codes, a person's transitions, and the driver's lease."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet.api.app import create_app
from fleet.api.auth import TokenFile, add_token
from fleet.rollouts import states
from fleet.rollouts.errors import LeaseLost
from fleet.rollouts.store import RolloutStore
from fleet.telemetry.store import TelemetryStore
from tests.fleet_api_support import put_status
from tests.test_fleet_telemetry import db_url, pg_database, pg_url  # noqa: F401  (fixtures)

Api = tuple[TestClient, dict[str, str], dict[str, str]]


@pytest.fixture()
def store(db_url: str) -> Iterator[TelemetryStore]:  # noqa: F811
    s = TelemetryStore.open(db_url)
    for i in range(20):
        put_status(s, f"gh-{i:02d}", tags=["greenhouse"], state="online" if i % 5 else "offline")
    put_status(s, "lab-1", hardware=["x86_64"], tags=["lab"])
    yield s
    s.close()


@pytest.fixture()
def api(store: TelemetryStore, tmp_path: Path) -> Iterator[Api]:
    path = tmp_path / "tokens"
    read, admin = add_token(path, "read", "ops"), add_token(path, "admin", "alice")
    with TestClient(create_app(store, TokenFile(path))) as client:
        yield client, {"Authorization": f"Bearer {read}"}, {"Authorization": f"Bearer {admin}"}


def start(api: Api, **body: Any) -> Any:
    client, _, admin = api
    return client.post("/api/v1/rollouts", json={"target": "tiny@0.0.2", **body}, headers=admin)


def test_a_rollout_is_created_with_its_waves_and_devices(api: Api) -> None:
    client, read, _ = api
    r = start(api, selector="tag=greenhouse", waves="10%,50%,100%", canary=["lab-1"], rules={"soak_s": 5})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["state"] == "running" and doc["created_by"] == "alice" and doc["current_wave"] == 0
    assert [w["size"] for w in doc["waves"]] == [1, 2, 8, 10]  # the canary, then 10%, 50%, 100% of 20
    assert doc["counts"] == {"pending": 21} and doc["rules"]["soak_s"] == 5.0
    assert client.get(f"/api/v1/rollouts/{doc['id']}", headers=read).json()["target"] == "tiny@0.0.2"
    listed = client.get("/api/v1/rollouts", headers=read).json()["rollouts"]
    assert [x["id"] for x in listed] == [doc["id"]]
    devices = client.get(f"/api/v1/rollouts/{doc['id']}/devices", headers=read).json()["devices"]
    assert devices[0] == {
        "device_id": "lab-1",
        "wave": 0,
        "state": "pending",
        "reason_code": None,
        "reason": None,
        "from_pack": "tiny@0.0.1",
        "sent_at": None,
        "activated_at": None,
        "confirmed_at": None,
        "updated_at": devices[0]["updated_at"],
        "rb_state": None,
        "rb_sent_at": None,
    }
    assert "envelope" not in devices[0]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"target": "nope"}, 422, "bad_target"),
        ({"waves": "50%"}, 422, "bad_waves"),
        ({"canary": ["ghost"]}, 422, "unknown_device"),
        ({"selector": "tag=nowhere"}, 422, "no_devices"),
        ({"selector": "colour=red"}, 422, "bad_selector"),
        ({"rules": {"max_failure_rate": -1}}, 422, "bad_rules"),
    ],
)
def test_a_bad_rollout_is_refused_with_its_code(
    api: Api, body: dict[str, Any], status: int, code: str
) -> None:
    r = start(api, **body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)


def test_only_an_admin_token_starts_or_changes_a_rollout(api: Api) -> None:
    client, read, _ = api
    assert client.post("/api/v1/rollouts", json={"target": "tiny@0.0.2"}).status_code == 401
    r = client.post("/api/v1/rollouts", json={"target": "tiny@0.0.2"}, headers=read)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    rid = start(api).json()["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/pause", headers=read).status_code == 403
    assert client.get(f"/api/v1/rollouts/{rid}").status_code == 401


def test_a_huge_or_broken_body_is_refused(api: Api) -> None:
    client, _, admin = api
    r = client.post("/api/v1/rollouts", content=b"{" + b" " * 70_000, headers=admin)
    assert r.json()["error"]["code"] == "too_large"
    for bad in (
        b"\xff",
        b"[" * 60_000,
        b'{"target": "tiny@0.0.2", "rules": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ):
        r = client.post("/api/v1/rollouts", content=bad, headers=admin)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "bad_request")  # not a 500


def test_transitions_and_their_refusals(api: Api, store: TelemetryStore) -> None:
    client, read, admin = api
    rid = start(api).json()["id"]

    def act(action: str) -> tuple[int, str]:
        r = client.post(f"/api/v1/rollouts/{rid}/{action}", headers=admin)
        return r.status_code, r.json()["state"] if r.status_code == 200 else r.json()["error"]["code"]

    assert act("resume") == (409, "bad_state")
    assert act("pause") == (200, "paused")
    assert act("pause") == (409, "bad_state")
    assert act("resume") == (200, "running")
    assert act("abort") == (200, "aborted")
    assert set(client.get(f"/api/v1/rollouts/{rid}", headers=read).json()["counts"]) == {"aborted"}
    assert act("resume") == (409, "bad_state")
    assert act("rollback") == (200, "rolling_back")
    missing = client.post("/api/v1/rollouts/r-000000000000/pause", headers=admin)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    assert client.get("/api/v1/rollouts/nope", headers=read).status_code == 422


def test_resuming_a_halt_accepts_that_wave(api: Api, store: TelemetryStore) -> None:
    rollouts = RolloutStore(store)
    rid = start(api).json()["id"]
    assert rollouts.acquire(rid, "driver-a", time.time())
    with rollouts.fenced(rid, "driver-a", time.time()) as conn:
        rollouts.set_rollout(
            conn, rid, time.time(), state="halted", halt='{"rule": "failure_rate", "wave": 0}'
        )
    client, _, admin = api
    doc = client.post(f"/api/v1/rollouts/{rid}/resume", headers=admin).json()
    assert doc["state"] == "running" and doc["halt"] is None and doc["overridden_waves"] == [0]


def test_one_driver_holds_a_rollout_and_another_takes_over_when_it_lapses(
    api: Api, store: TelemetryStore
) -> None:
    rollouts = RolloutStore(store, lease_s=5.0)
    rid = start(api).json()["id"]
    now = time.time()
    assert rollouts.acquire(rid, "a", now)
    assert not rollouts.acquire(rid, "b", now + 1)  # held
    assert rollouts.acquire(rid, "a", now + 2)  # renewed by its holder
    with pytest.raises(LeaseLost), rollouts.fenced(rid, "b", now + 3):
        pass
    assert rollouts.acquire(rid, "b", now + 8)  # a's lease (renewed at +2) lapsed at +7
    with pytest.raises(LeaseLost), rollouts.fenced(rid, "a", now + 8.5):
        pass  # a woke up late: none of its writes land
    with rollouts.fenced(rid, "b", now + 9) as conn:
        rollouts.set_devices(conn, rid, [{"device_id": "gh-01", "state": states.SENT}])
    assert rollouts.devices(rid, states.SENT)[0].device_id == "gh-01"
    rollouts.release(rid, "b")
    assert rollouts.acquire(rid, "a", now + 9.5)  # released: no wait for the expiry
