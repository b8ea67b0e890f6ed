"""The fleet dashboard (fleet/dashboard/): the static shell and its headers, then the page in a
real headless chromium against a real `edge-fleet service` process: the token form, the
fleet's figures as the store holds them, a device's charts with their gaps, a rollout's waves
and halt, and a rollout paused from its page. Screenshots of the three pages are written to
$DASHBOARD_SCREENSHOTS (default: test-artifacts/screenshots/)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet.api.app import create_app
from fleet.api.auth import TokenFile, add_token
from fleet.dashboard import CSP, static_files
from fleet.telemetry.store import TelemetryStore
from tests.dashboard_support import (
    LOST_GAP,
    OPEN_GAP,
    Api,
    chromium,
    fill_fleet,
    full_page_screenshot,
    halt_like_the_driver,
    screenshots_dir,
)
from tests.fleet_api_support import ServiceProcess

# ---------------------------------------------------------------- the shell (no browser)


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    store = TelemetryStore.open(str(tmp_path / "fleet.sqlite3"))
    tokens = tmp_path / "tokens"
    add_token(tokens, "read", "ops")
    with TestClient(create_app(store, TokenFile(tokens))) as c:
        yield c
    store.close()


def test_the_shell_is_served_without_a_token_with_a_strict_csp(client: TestClient) -> None:
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard/"
    assert client.get("/dashboard", follow_redirects=False).headers["location"] == "/dashboard/"
    page = client.get("/dashboard/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("", "app.js", "api.js", "view.js", "device.js", "charts.js", "style.css", "favicon.svg"):
        r = client.get(f"/dashboard/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-security-policy"] == CSP
        assert "default-src 'self'" in CSP and "script-src 'self'" in CSP and "unsafe" not in CSP
        assert r.headers["x-content-type-options"] == "nosniff" and "set-cookie" not in r.headers
    assert client.get("/dashboard/app.js").headers["content-type"].startswith("text/javascript")
    missing = client.get("/dashboard/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/api/v1/summary").status_code == 401  # the data stays behind the tokens


def test_the_static_files_hold_no_inline_script_and_reach_no_other_host() -> None:
    files = static_files()
    pages = {"app.js", "api.js", "view.js", "summary.js", "rollout.js", "device.js", "charts.js"}
    assert {"index.html", "style.css", *pages} <= set(files)
    html = files["index.html"][0].decode()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(" src=" in s for s in scripts)  # no inline script (CSP refuses it)
    assert not re.search(r"\son[a-z]+=", html) and " style=" not in html  # no inline handler or style
    for name, (body, _) in files.items():
        urls = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body.decode()))
        assert urls <= {"http://www.w3.org"}, (name, urls)  # SVG's namespace only; no CDN, no fonts


# ---------------------------------------------------------------- the page in chromium


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    """Poll until ``check`` returns something truthy; Selenium's stale or missing elements retry."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            found = check()
            if found:
                return found
        except (NoSuchElementException, StaleElementReferenceException) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} ({last!r})")


def click(driver: Any, css: str) -> None:
    """Click what ``css`` finds, finding it again if the page redrew it in between."""
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, css).click() or True, f"to click {css}")


def table_counts(driver: Any, table_id: str) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr[data-key]")
    return {r.get_attribute("data-key"): int(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows}


def browser_errors(driver: Any) -> list[str]:
    """Console errors but the failed API calls the test makes on purpose (401, 409, 422)."""
    entries = driver.get_log("browser")
    return [
        e["message"]
        for e in entries
        if e["level"] == "SEVERE" and not re.search(r"status of (401|409|422)", e["message"])
    ]


def test_the_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = chromium()  # before anything else: a missing chromium fails here, with the install lines
    shots = screenshots_dir()
    now = time.time()
    db = str(tmp_path / "fleet.sqlite3")
    store = TelemetryStore.open(db)
    expected = fill_fleet(store, now)
    tokens = tmp_path / "tokens"
    read, admin = add_token(tokens, "read", "ops"), add_token(tokens, "admin", "root")
    service = ServiceProcess(["--db", db, "--api-only", "--tokens", str(tokens), "--roll-every", "1"])
    try:
        service.wait_ready()
        api = Api(service.url, admin)
        assert api.get("/summary")["by_pack"] == expected["by_pack"]
        status, halted = api.call(
            "POST",
            "/rollouts",
            {"target": "tiny@0.0.3", "selector": "tag=greenhouse", "canary": ["gh-3"], "waves": "50%,100%"},
        )
        assert status == 201, (status, halted)
        halt_like_the_driver(store, halted["id"], time.time())
        status, rollout = api.call(
            "POST",
            "/rollouts",
            {"target": "tiny@0.0.2", "selector": "tag=greenhouse", "canary": ["gh-1"], "waves": "1,100%"},
        )
        assert status == 201 and rollout["state"] == "running", (status, rollout)

        # ------------------------------------------------ the token form: a wrong token, then a right one
        driver.get(f"{service.url}/")
        assert driver.current_url == f"{service.url}/dashboard/"
        field = wait_for(lambda: driver.find_element(By.NAME, "token"), "the token form")
        field.send_keys("not-a-token")
        click(driver, "form.token button")
        message = wait_for(
            lambda: driver.find_element(By.CSS_SELECTOR, "form.token [data-role=message]:not([hidden])"),
            "the API's 401 on the token form",
        )
        assert message.text.startswith("unauthorized: "), message.text
        driver.find_element(By.NAME, "token").send_keys(admin)
        click(driver, "form.token button")

        # ------------------------------------------------ #/ : the figures the store holds
        wait_for(
            lambda: driver.find_element(By.ID, "device-count").text == str(expected["devices"]), "devices"
        )
        summary = api.get("/summary")
        assert table_counts(driver, "by-state") == summary["by_state"] == expected["by_state"]
        assert table_counts(driver, "by-pack") == summary["by_pack"] == expected["by_pack"]
        requests = driver.find_element(By.ID, "requests").text
        assert str(summary["requests_total"]) in requests and str(summary["errors_total"]) in requests
        gap_counts = wait_for(lambda: driver.find_element(By.ID, "gap-counts").text, "gap counts")
        assert re.search(r"open.*\n?1\b", gap_counts) and re.search(r"lost.*\n?1\b", gap_counts), gap_counts
        listed = wait_for(
            lambda: driver.find_elements(By.CSS_SELECTOR, "#device-list tbody tr[data-id]"), "device list"
        )
        assert [r.get_attribute("data-id") for r in listed] == ["gh-1", "gh-2", "gh-3", "lab-1", "lab-2"]
        rows = wait_for(
            lambda: driver.find_elements(By.CSS_SELECTOR, "#rollout-list tbody tr[data-id]"), "rollout list"
        )
        assert [r.get_attribute("data-id") for r in rows] == [rollout["id"], halted["id"]]  # newest first
        assert "failure_rate" in rows[1].text and "halted" in rows[1].text
        full_page_screenshot(driver, shots / "summary.png")

        # ------------------------------------------------ #/devices/gh-1 : charts over six hours, gaps
        # the registry by selector; a bad one shows the API's error in place
        def listed_ids() -> list[str]:
            rows = driver.find_elements(By.CSS_SELECTOR, "#device-list tbody tr[data-id]")
            return [r.get_attribute("data-id") for r in rows]

        driver.find_element(By.CSS_SELECTOR, "#device-selector input").send_keys("tag=lab")
        click(driver, "#device-selector button")
        wait_for(lambda: listed_ids() == ["lab-1", "lab-2"], "the devices tag=lab selects")
        field = driver.find_element(By.CSS_SELECTOR, "#device-selector input")
        field.clear()
        field.send_keys("colour=red")
        click(driver, "#device-selector button")
        refused = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "#devices p.error"), "bad_selector")
        assert refused.text.startswith("bad_selector: "), refused.text
        driver.get(f"{service.url}/dashboard/#/")
        wait_for(lambda: driver.find_element(By.LINK_TEXT, "gh-1"), "the registry").click()
        wait_for(lambda: "Device gh-1" in driver.find_element(By.TAG_NAME, "h1").text, "the device page")
        chart = wait_for(
            lambda: driver.find_element(By.CSS_SELECTOR, "#chart-rss svg.chart"), "the RSS chart"
        )
        since, until, step = (int(chart.get_attribute(f"data-{k}")) for k in ("since", "until", "step"))
        points = api.get(f"/devices/gh-1/series?metric=rss_mb&since={since}&until={until}&step={step}")[
            "points"
        ]
        assert len(points) >= expected["metrics_records"] - 2  # a bucket may hold two records at its edges
        assert int(chart.get_attribute("data-points")) == len(points)
        lines = chart.find_elements(By.CSS_SELECTOR, "path.line")
        assert len(lines) >= 2, "the open gap breaks the line"  # and the lost gap: three runs
        assert sum(int(p.get_attribute("data-points")) for p in lines) == len(points)
        assert all(len(re.findall(r"[ML][\d.]+,[\d.]+", p.get_attribute("d"))) > 1 for p in lines)
        assert int(chart.get_attribute("data-gaps")) >= 2
        for name in ("tokens", "latency", "ttft", "temperature", "errors"):
            svg = wait_for(lambda n=name: driver.find_element(By.CSS_SELECTOR, f"#chart-{n} svg.chart"), name)
            assert int(svg.get_attribute("data-points")) > 10, name
        latest = driver.find_element(By.ID, "latest-metrics").text
        assert f"{expected['last_rss']:g} MB" in latest, latest
        gaps = {
            (r.get_attribute("data-from"), r.get_attribute("data-to")): r.text
            for r in driver.find_elements(By.CSS_SELECTOR, "#device-gaps tbody tr[data-from]")
        }
        assert "open" in gaps[tuple(map(str, OPEN_GAP))] and "lost" in gaps[tuple(map(str, LOST_GAP))], gaps
        full_page_screenshot(driver, shots / "device.png")

        # ---------------------------------------- #/rollouts/ID : the halted one, pause the running one
        driver.get(f"{service.url}/dashboard/#/rollouts/{halted['id']}")
        halt = wait_for(lambda: driver.find_element(By.ID, "halt"), "the halt")
        assert "failure_rate" in halt.text and "100%" in halt.text and "gh-3" in halt.text
        wave0 = driver.find_element(By.CSS_SELECTOR, "#waves tr[data-wave='0']").text
        assert "rolled_back 1" in wave0, wave0
        full_page_screenshot(driver, shots / "rollout-halted.png")

        driver.get(f"{service.url}/dashboard/#/rollouts/{rollout['id']}")
        wait_for(lambda: driver.find_element(By.ID, "rollout-state").text == "running", "a running rollout")
        waves = driver.find_elements(By.CSS_SELECTOR, "#waves tbody tr[data-wave]")
        assert [w.find_elements(By.TAG_NAME, "td")[1].text for w in waves] == [
            str(w["size"]) for w in rollout["waves"]
        ]
        listed = wait_for(
            lambda: driver.find_elements(By.CSS_SELECTOR, "#rollout-devices tbody tr[data-id]"), "its devices"
        )
        assert {r.get_attribute("data-id") for r in listed} == {"gh-1", "gh-2", "gh-3"}
        assert driver.find_element(By.CSS_SELECTOR, "[data-action=resume]").get_attribute("disabled")
        click(driver, "[data-action=pause]")
        wait_for(lambda: api.get(f"/rollouts/{rollout['id']}")["state"] == "paused", "the API to say paused")
        wait_for(
            lambda: driver.find_element(By.ID, "rollout-state").text == "paused", "the page to say paused"
        )
        assert driver.find_element(By.CSS_SELECTOR, "[data-action=pause]").get_attribute("disabled")
        assert driver.find_element(By.CSS_SELECTOR, "[data-action=resume]").get_attribute("disabled") is None
        full_page_screenshot(driver, shots / "rollout.png")

        # ------------------------------------------------ a refused action shows the API's error
        driver.execute_script("document.querySelector('[data-action=pause]').disabled = false")
        click(driver, "[data-action=pause]")
        banner = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "#error:not([hidden])"), "the 409")
        assert banner.text.startswith("bad_state: "), banner.text
        click(driver, "[data-action=resume]")
        wait_for(lambda: api.get(f"/rollouts/{rollout['id']}")["state"] == "running", "resumed")
        wait_for(lambda: driver.find_element(By.ID, "rollout-state").text == "running", "the page resumed")
        click(driver, "[data-action=pause]")
        wait_for(lambda: api.get(f"/rollouts/{rollout['id']}")["state"] == "paused", "paused again")

        # ------------------------------------------------ start one from the form, abort it (a confirm)
        driver.get(f"{service.url}/dashboard/#/")
        wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "details.start summary"), "the form").click()
        form = driver.find_element(By.ID, "start-rollout")
        for name, value in (("target", "tiny@0.0.2"), ("selector", "tag=lab"), ("waves", "100%")):
            form.find_element(By.NAME, name).clear()
            form.find_element(By.NAME, name).send_keys(value)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        page = wait_for(
            lambda: driver.find_element(By.CSS_SELECTOR, ".page.rollout"), "the new rollout's page"
        )
        started = api.get(f"/rollouts/{page.get_attribute('data-id')}")
        assert (started["target"], started["selector"], started["created_by"]) == (
            "tiny@0.0.2",
            "tag=lab",
            "root",
        )
        assert started["counts"] == {"pending": 2}
        click(driver, "[data-action=abort]")
        driver.switch_to.alert.accept()
        wait_for(
            lambda: api.get(f"/rollouts/{started['id']}")["state"] == "aborted", "the API to say aborted"
        )
        driver.get(f"{service.url}/dashboard/#/rollouts/{rollout['id']}")

        # ------------------------------------------------ a read token sees everything, may change nothing
        driver.find_element(By.ID, "forget").click()
        wait_for(lambda: driver.find_element(By.NAME, "token"), "the token form").send_keys(read)
        click(driver, "form.token button")
        wait_for(
            lambda: driver.find_element(By.ID, "rollout-state").text == "paused", "the rollout, read-only"
        )
        click(driver, "[data-action=resume]")
        banner = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "#error:not([hidden])"), "the 403")
        assert banner.text.startswith("forbidden: "), banner.text
        assert api.get(f"/rollouts/{rollout['id']}")["state"] == "paused"
        assert driver.execute_script("return document.cookie") == ""
        errors = [e for e in browser_errors(driver) if "status of 403" not in e]
        assert errors == [], errors  # no CSP refusal, no script error
    finally:
        driver.quit()
        store.close()
        assert service.stop() == 0, service.logs[-5:]
