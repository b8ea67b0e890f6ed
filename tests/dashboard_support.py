"""Helpers for tests/test_dashboard.py: a simulated fleet written through the store API (five
devices, six hours of one device's metrics with an open and a lost gap, two rollouts, one of
them halted the way the driver halts one), a headless chromium driven by Selenium with the
system chromedriver, and the screenshot folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fleet.rollouts.rules import Halt
from fleet.rollouts.store import RolloutStore
from fleet.telemetry.store import TelemetryStore
from tests.fleet_api_support import put_records, put_status
from tests.fleet_telemetry_support import REPO

CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = (
    "the dashboard test drives Debian's chromium: `make browser`, or as root "
    "`apt-get install -y chromium chromium-driver` (and `pip install -e '.[dev]'` for selenium)"
)
STEP_S = 300  # one metrics record every 5 minutes
HISTORY = 72  # six hours of them
OPEN_GAP = (30, 35)  # never delivered: an open gap, and half an hour with no data on the charts
LOST_GAP = (60, 62)  # dropped on the device (spool full), as a `dropped` record says


def screenshots_dir() -> Path:
    """``$DASHBOARD_SCREENSHOTS``, else ``test-artifacts/screenshots/`` in the repo (gitignored)."""
    where = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or REPO / "test-artifacts" / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


def gh1_data(seq: int) -> dict[str, Any]:
    """A metrics record as the agent writes it (docs/protocol.md#telemetry), smooth in seq."""
    wave = math.sin(seq / 9)
    timeouts = 2 if seq % 10 == 0 else 0
    return {
        "pack": {"name": "tiny", "version": "0.0.1"},
        "agent_version": "0.1.0",
        "uptime_s": seq * STEP_S,
        "load1": 0.4,
        "cpu_temp_c": round(55 + 6 * wave, 1),
        "rss_mb": 300.0 + seq,
        "disk_free_mb": 2048,
        "queue_depth": 0,
        "requests": {"query": {"ok": 12, "timeout": timeouts}, "read": {"ok": 3}},
        "answers": {
            "count": 12,
            "latency_ms": {"p50": round(900 + 150 * wave), "p95": round(1600 + 300 * wave)},
            "ttft_ms": {"p50": 180, "p95": 260},
            "tokens_per_s_p50": round(21 + 3 * wave, 2),
            "ungrounded": 0,
        },
        "reconnects": 0,
        "reply_failures": 0,
        "spool": {"records": 0, "oldest_ts": None, "dropped_total": 0},
    }


def fill_fleet(store: TelemetryStore, now: float) -> dict[str, Any]:
    """The devices, gh-1's history and the expected figures."""
    put_status(store, "gh-1", hardware=["aarch64"], tags=["greenhouse", "site=north"])
    put_status(store, "gh-2", pack=("tiny", "0.0.2"), hardware=["aarch64"], tags=["greenhouse"])
    put_status(store, "gh-3", hardware=["aarch64"], tags=["greenhouse"])
    put_status(store, "lab-1", state="offline", hardware=["x86_64"], tags=["lab"])
    put_status(store, "lab-2", state="updating", hardware=["x86_64"], tags=["lab"])
    start = now - HISTORY * STEP_S
    skipped = set(range(OPEN_GAP[0], OPEN_GAP[1] + 1)) | set(range(LOST_GAP[0], LOST_GAP[1] + 1))
    records: list[dict[str, Any]] = [
        {"seq": s, "ts": start + s * STEP_S, "kind": "metrics", "data": gh1_data(s)}
        for s in range(1, HISTORY)
        if s not in skipped
    ]
    first, last = LOST_GAP
    dropped = {"from_seq": first, "to_seq": last, "count": last - first + 1, "reason": "spool_full"}
    records.append({"seq": HISTORY, "ts": now, "kind": "dropped", "data": dropped})
    for i in range(0, len(records), 50):  # a telemetry message holds at most 50 records
        put_records(store, "gh-1", records[i : i + 50])
    return {
        "devices": 5,
        "by_state": {"online": 3, "offline": 1, "updating": 1},
        "by_pack": {"tiny@0.0.1": 4, "tiny@0.0.2": 1},
        "last_rss": gh1_data(HISTORY - 1)["rss_mb"],
        "metrics_records": len(records) - 1,
    }


def halt_like_the_driver(store: TelemetryStore, rollout_id: str, now: float) -> None:
    """What the driver writes when a canary fails its health probe: wave 0 started and
    settled, the canary rolled back, the rollout halted by the failure-rate rule."""
    rollouts = RolloutStore(store)
    owner = "dashboard-test"
    assert rollouts.acquire(rollout_id, owner, now)
    with rollouts.fenced(rollout_id, owner, now) as conn:
        rollouts.set_wave(conn, rollout_id, 0, started_at=now - 600, completed_at=now - 60)
        rollouts.set_devices(
            conn,
            rollout_id,
            [{"device_id": "gh-3", "state": "rolled_back", "reason_code": "health_probe", "updated_at": now}],
        )
        halt = Halt(
            rule="failure_rate",
            wave=0,
            devices=["gh-3"],
            figures={"failed": 1, "judged": 1, "failure_rate": 1.0, "max_failure_rate": 0.1},
            message="1 of 1 devices failed or rolled back (100%), over the 10% allowed",
            at=now - 60,
        )
        rollouts.set_rollout(
            conn, rollout_id, now, state="halted", current_wave=0, halt=json.dumps(halt.to_json())
        )
    rollouts.release(rollout_id, owner)


class Api:
    """The service's API with one token, as a script would call it."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/api/v1{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str) -> Any:
        status, doc = self.call("GET", path)
        assert status == 200, (path, status, doc)
        return doc


def chromium() -> Any:
    """A headless chromium from the system packages, through the system chromedriver: nothing
    is downloaded (no Selenium Manager). Missing: the test fails and says how to install it."""
    binary = shutil.which("chromium")
    if binary is None or not os.access(CHROMEDRIVER, os.X_OK):
        pytest.fail(f"chromium or {CHROMEDRIVER} is missing: {INSTALL}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def full_page_screenshot(driver: Any, path: Path) -> None:
    """The whole page: the window grows to the document's height first."""
    height, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(1400, min(max(int(height) + int(chrome) + 4, 800), 8000))
    time.sleep(0.2)
    assert driver.save_screenshot(str(path)), path
    driver.set_window_size(1400, 1000)
