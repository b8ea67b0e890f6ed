"""The fleet service: registry selectors, the HTTP API, retention, /metrics, the CLI clients.

Real parts only: SQLite files and a throwaway PostgreSQL database (the fixtures of
tests/test_fleet_telemetry.py), the real FastAPI app (TestClient), and one end-to-end run of
`edge-fleet service` (a real uvicorn on a free port, ingesting from the session's mosquitto)
that fake devices publish to and the `edge-fleet devices|device show|metrics` clients read.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, func, select

from agent.localbroker import LocalBroker
from fleet.api.app import create_app
from fleet.api.auth import TokenFile, TokenFileError, parse_tokens
from fleet.metrics import ServiceMetrics
from fleet.telemetry import migrations, retention, schema, selectors
from fleet.telemetry.errors import InvalidPayload
from fleet.telemetry.payloads import parse_status
from fleet.telemetry.queries import FleetQueries, SeriesQuery
from fleet.telemetry.store import TelemetryStore, database_url
from tests.certs import make_pki
from tests.fleet_api_support import (
    ServiceProcess,
    cli,
    metrics_record,
    put_records,
    put_status,
    status_doc,
    telemetry_doc,
    tokens_file,
)
from tests.fleet_telemetry_support import Publisher, wait_until
from tests.test_fleet_telemetry import db_url, pg_database, pg_url  # noqa: F401  (fixtures)

HOUR = 3600.0


def create_engine_for(where: str) -> Engine:
    return create_engine(database_url(where))


@pytest.fixture()
def store(db_url: str) -> Iterator[TelemetryStore]:  # noqa: F811
    s = TelemetryStore.open(db_url)
    yield s
    s.close()


@pytest.fixture()
def fleet(store: TelemetryStore) -> TelemetryStore:
    """Three devices: two aarch64 greenhouses (one on the new pack), one x86 lab box offline."""
    put_status(store, "gh-1", hardware=["aarch64", "aarch64-dotprod"], tags=["greenhouse", "site=north"])
    put_status(
        store, "gh-2", pack=("tiny", "0.0.2"), hardware=["aarch64", "aarch64-no-dotprod"], tags=["greenhouse"]
    )
    put_status(store, "lab-1", state="offline", hardware=["x86_64"], tags=["lab", "site=north"])
    return store


@pytest.fixture()
def api(fleet: TelemetryStore, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str]]]:
    path = tmp_path / "tokens"
    path.write_text("")
    from fleet.api.auth import add_token

    read, admin = add_token(path, "read", "ops"), add_token(path, "admin", "root")
    queries = FleetQueries(fleet.engine)
    metrics = ServiceMetrics(None, queries.gap_counts, queries.rollup_backlog)
    with TestClient(create_app(fleet, TokenFile(path), metrics)) as client:
        yield client, {"Authorization": f"Bearer {read}"}, {"Authorization": f"Bearer {admin}"}


def ids(store: TelemetryStore, selector: str) -> list[str]:
    return [d.device_id for d in FleetQueries(store.engine).devices(selectors.parse(selector))]


# ---------------------------------------------------------------- registry and selectors (both backends)


def test_selectors_combine_with_and(fleet: TelemetryStore) -> None:
    assert ids(fleet, "") == ["gh-1", "gh-2", "lab-1"]
    assert ids(fleet, "hardware=aarch64") == ["gh-1", "gh-2"]
    assert ids(fleet, "hardware=aarch64-no-dotprod") == ["gh-2"]
    assert ids(fleet, "tag=site=north") == ["gh-1", "lab-1"]
    assert ids(fleet, "tag=site=north,hardware=aarch64") == ["gh-1"]
    assert ids(fleet, "pack=tiny") == ["gh-1", "gh-2", "lab-1"]
    assert ids(fleet, "pack=tiny@0.0.2") == ["gh-2"]
    assert ids(fleet, "state=offline") == ["lab-1"]
    assert ids(fleet, "state=online,tag=greenhouse,pack=tiny@0.0.1") == ["gh-1"]
    assert ids(fleet, "tag=nowhere") == []


def test_a_newer_status_replaces_labels_and_an_older_agent_keeps_them(fleet: TelemetryStore) -> None:
    put_status(fleet, "gh-1", tags=["greenhouse", "site=south"], hardware=None)
    device = FleetQueries(fleet.engine).device("gh-1")
    assert device is not None
    assert device.tags == ["greenhouse", "site=south"] and device.hardware == ["aarch64", "aarch64-dotprod"]
    put_status(fleet, "gh-1", tags=[])
    assert ids(fleet, "tag=greenhouse") == ["gh-2"]


@pytest.mark.parametrize(
    "text",
    ["colour=red", "tag=", "state=asleep", "pack=@1.0", "hardware", "tag=a b", ",".join(["tag=x"] * 17)],
)
def test_bad_selectors_are_refused(text: str) -> None:
    with pytest.raises(selectors.SelectorError):
        selectors.parse(text)


def test_status_labels_are_bounded() -> None:
    with pytest.raises(InvalidPayload, match="hardware"):
        parse_status("d", status_doc("d", hardware=["x" * 129]))
    with pytest.raises(InvalidPayload, match="tags"):
        parse_status("d", status_doc("d", tags=["a,b"]))
    with pytest.raises(InvalidPayload, match="tags"):
        parse_status("d", status_doc("d", tags=[f"t{i}" for i in range(33)]))


def test_token_file_format() -> None:
    with pytest.raises(TokenFileError, match=":2:"):
        parse_tokens("# comment\nroot 1234\n")
    assert parse_tokens(f"admin {'a' * 64} ci\n")["a" * 64].role == "admin"


# ---------------------------------------------------------------- the API (both backends)


def test_auth_no_token_wrong_token_and_read_on_admin(
    api: tuple[TestClient, dict[str, str], dict[str, str]],
) -> None:
    client, read, admin = api
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        r = client.get("/api/v1/devices", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = client.post("/api/v1/retention/prune?raw_days=7", headers=read)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert client.post("/api/v1/retention/prune?raw_days=7", headers=admin).status_code == 200
    assert client.get("/api/v1/devices", headers=admin).status_code == 200  # admin includes read
    assert client.get("/openapi.json").json()["paths"]["/api/v1/devices/{device_id}/series"]
    r = client.post("/api/v1/retention/prune", params={"raw_days": 30, "rollup_days": 7}, headers=admin)
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_retention"


def test_a_token_file_that_goes_away_refuses_everyone(
    api: tuple[TestClient, dict[str, str], dict[str, str]], tmp_path: Path
) -> None:
    client, read, _ = api
    (tmp_path / "tokens").unlink()
    r = client.get("/api/v1/devices", headers=read)
    assert r.status_code == 503 and r.json()["error"]["code"] == "tokens_unavailable"


def test_devices_and_device_detail(
    api: tuple[TestClient, dict[str, str], dict[str, str]], fleet: TelemetryStore
) -> None:
    client, read, _ = api
    now = time.time()
    put_records(fleet, "gh-1", [metrics_record(1, now - 60, 300, 800), metrics_record(3, now, 310, 900)])
    body = client.get(
        "/api/v1/devices", params={"selector": "hardware=aarch64,state=online"}, headers=read
    ).json()
    assert [d["device_id"] for d in body["devices"]] == ["gh-1", "gh-2"]
    assert body["devices"][0]["pack"] == "tiny@0.0.1" and body["devices"][0]["tags"] == [
        "greenhouse",
        "site=north",
    ]
    detail = client.get("/api/v1/devices/gh-1", headers=read).json()
    assert detail["device"]["hardware"] == ["aarch64", "aarch64-dotprod"]
    assert detail["latest_metrics"]["seq"] == 3 and detail["latest_metrics"]["data"]["rss_mb"] == 310
    assert detail["gaps"] == [
        {"from_seq": 2, "to_seq": 2, "state": "open", "detected_at": detail["gaps"][0]["detected_at"]}
    ]
    gaps = client.get("/api/v1/gaps", params={"state": "open"}, headers=read).json()
    assert gaps["counts"] == {"open": 1} and gaps["gaps"][0]["device_id"] == "gh-1"
    r = client.get("/api/v1/devices/nobody", headers=read)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_series_per_device_and_across_a_selection(
    api: tuple[TestClient, dict[str, str], dict[str, str]], fleet: TelemetryStore
) -> None:
    client, read, _ = api
    t0 = (time.time() // HOUR - 3) * HOUR  # three whole hours ago
    put_records(fleet, "gh-1", [metrics_record(1, t0 + 10, 100, 500), metrics_record(2, t0 + 20, 300, 700)])
    put_records(
        fleet, "gh-2", [metrics_record(1, t0 + 30, 200, 1500), metrics_record(2, t0 + HOUR + 5, 50, 100)]
    )
    q = {"metric": "rss_mb", "since": str(t0), "until": str(t0 + 2 * HOUR), "step": "1h"}
    one = client.get("/api/v1/devices/gh-1/series", params=q, headers=read).json()
    assert one["points"] == [{"t": t0, "value": 200.0}]
    both = client.get(
        "/api/v1/series", params={**q, "selector": "tag=greenhouse", "agg": "max"}, headers=read
    ).json()
    assert both["points"] == [{"t": t0, "value": 300.0}, {"t": t0 + HOUR, "value": 50.0}]
    p95 = client.get(
        "/api/v1/series",
        params={
            **q,
            "metric": "answers.latency_ms.p95",
            "selector": "hardware=aarch64-no-dotprod",
            "agg": "sum",
        },
        headers=read,
    ).json()
    assert p95["points"] == [{"t": t0, "value": 1500.0}, {"t": t0 + HOUR, "value": 100.0}]


def test_summary_counts_and_error_rate(
    api: tuple[TestClient, dict[str, str], dict[str, str]], fleet: TelemetryStore
) -> None:
    client, read, _ = api
    now = time.time()
    put_records(fleet, "gh-1", [metrics_record(1, now - 100, 1, 1, ok=8, failed=2)])
    put_records(fleet, "gh-2", [metrics_record(1, now - 100, 1, 1, ok=9, failed=0)])
    put_records(fleet, "gh-2", [metrics_record(2, now - 3 * 86_400, 1, 1, ok=100, failed=100)])  # outside 24h
    body = client.get("/api/v1/summary", headers=read).json()
    assert body["devices"] == 3
    assert body["by_pack"] == {"tiny@0.0.1": 2, "tiny@0.0.2": 1}
    assert body["by_state"] == {"online": 2, "offline": 1}
    assert body["by_hardware"] == {"aarch64": 2, "aarch64-dotprod": 1, "aarch64-no-dotprod": 1, "x86_64": 1}
    assert body["requests"] == {"query": {"ok": 17, "timeout": 2}, "read": {"ok": 2}}
    assert body["requests_total"] == 21 and body["error_rate"] == pytest.approx(2 / 21)


@pytest.mark.parametrize(
    ("path", "params", "code"),
    [
        ("/api/v1/devices", {"selector": "colour=red"}, "bad_selector"),
        ("/api/v1/devices", {"selector": "x" * 2000}, "bad_parameter"),
        ("/api/v1/devices", {"limit": "0"}, "bad_parameter"),
        ("/api/v1/devices/bad id!", {}, "bad_parameter"),
        ("/api/v1/devices/gh-1/series", {}, "bad_parameter"),
        ("/api/v1/devices/gh-1/series", {"metric": "rss_mb;drop"}, "bad_metric"),
        ("/api/v1/devices/gh-1/series", {"metric": "rss_mb", "agg": "median"}, "bad_agg"),
        ("/api/v1/devices/gh-1/series", {"metric": "rss_mb", "since": "yesterday"}, "bad_since"),
        ("/api/v1/devices/gh-1/series", {"metric": "rss_mb", "since": "1h", "until": "2h"}, "bad_range"),
        ("/api/v1/series", {"metric": "rss_mb", "since": "30d", "step": "1"}, "bad_step"),
        ("/api/v1/series", {"metric": "rss_mb", "since": "9999d"}, "bad_since"),
        ("/api/v1/gaps", {"state": "filled"}, "bad_parameter"),
        ("/api/v1/summary", {"window": "forever"}, "bad_window"),
    ],
)
def test_bad_parameters_get_stable_codes(
    api: tuple[TestClient, dict[str, str], dict[str, str]], path: str, params: dict[str, str], code: str
) -> None:
    client, read, _ = api
    r = client.get(path, params=params, headers=read)
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_retention_prunes_raw_records_and_series_still_answer(
    api: tuple[TestClient, dict[str, str], dict[str, str]], fleet: TelemetryStore
) -> None:
    client, _, admin = api
    t0 = (time.time() // HOUR) * HOUR - 10 * 86_400  # ten days ago, on the hour
    old = [metrics_record(i + 1, t0 + i * 600, 100 + i, 10 * i, ok=1, failed=1) for i in range(12)]  # 2 hours
    put_records(fleet, "gh-1", [*old, metrics_record(13, time.time(), 1, 1)])
    q = {"metric": "rss_mb", "since": str(t0), "until": str(t0 + 4 * HOUR), "step": "1h"}

    def series(**extra: str) -> list[dict[str, float]]:
        points: list[dict[str, float]] = client.get(
            "/api/v1/series", params={**q, **extra}, headers=admin
        ).json()["points"]
        return points

    before = {agg: series(agg=agg) for agg in ("avg", "max", "min", "sum")}
    assert before["max"] == [{"t": t0, "value": 105.0}, {"t": t0 + HOUR, "value": 111.0}]
    assert len(series(step="10m")) == 12  # raw records, before the prune
    r = client.post("/api/v1/retention/prune", params={"raw_days": 7}, headers=admin).json()
    assert r["records_pruned"] == 12 and fleet.record_count("gh-1") == 1
    assert {agg: series(agg=agg) for agg in before} == before
    assert series(step="10m", agg="max") == [{"t": t0, "value": 105.0}, {"t": t0 + HOUR, "value": 111.0}]
    too_soon = client.post("/api/v1/retention/prune", params={"raw_days": 0.5}, headers=admin)
    assert too_soon.status_code == 422 and too_soon.json()["error"]["code"] == "bad_parameter"
    again = client.post("/api/v1/retention/prune", params={"raw_days": 7}, headers=admin).json()
    assert again["records_pruned"] == 0
    put_records(fleet, "gh-1", [metrics_record(14, t0 + 30, 1000, 0)])  # a device back after weeks
    assert series(agg="max", selector="tag=greenhouse")[0]["value"] == 1000.0
    summary = client.get("/api/v1/summary", params={"window": "11d"}, headers=admin).json()
    assert summary["requests"]["query"]["timeout"] == 12  # from the rollups


def test_rolling_up_changes_no_answer_and_counts_each_record_once(
    api: tuple[TestClient, dict[str, str], dict[str, str]], fleet: TelemetryStore
) -> None:
    client, read, _ = api
    t0 = (time.time() // HOUR) * HOUR - 2 * HOUR
    for n, device in enumerate(("gh-1", "gh-2")):
        put_records(
            fleet, device, [metrics_record(i + 1, t0 + i * 900, 10 * n + i, i, ok=i) for i in range(8)]
        )
    queries = [
        (
            "/api/v1/series",
            {"metric": m, "since": str(t0), "until": str(t0 + 2 * HOUR), "step": step, "agg": agg},
        )
        for m in ("rss_mb", "requests.query.ok")
        for step in ("1h", "15m")
        for agg in ("avg", "max", "min", "sum")
    ] + [("/api/v1/summary", {"window": "3h"})]

    def answers() -> list[object]:
        found = [client.get(path, params=params, headers=read).json() for path, params in queries]
        return [a.get("points", a.get("requests")) for a in found]

    before = answers()
    rollers = [threading.Thread(target=retention.roll, args=(fleet,)) for _ in range(2)]
    for t in rollers:
        t.start()
    for t in rollers:
        t.join(30)
    assert retention.roll(fleet) == 0
    with fleet.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.unrolled)).scalar_one() == 0
        m = schema.metric_rollups.c
        counted = conn.execute(select(func.sum(m.count)).where(m.metric == "rss_mb")).scalar_one()
    assert counted == 16  # two concurrent rollers, each record once
    assert answers() == before


def test_migration_2_rolls_up_records_stored_before_it(db_url: str) -> None:  # noqa: F811
    """A version-1 database (migration 1 only) gains the rollups of its records when opened."""
    first = TelemetryStore(create_engine_for(db_url))
    with first.write() as conn:
        schema.metadata.create_all(conn, tables=[schema.schema_version])
        migrations.MIGRATIONS[0].apply(conn)
        conn.execute(schema.schema_version.insert().values(version=1, name="v1", applied_at=0.0))
        conn.execute(schema.devices.insert().values(device_id="old-1", first_seen=0, last_seen=0, max_seq=2))
        for seq, rss in ((1, 10.0), (2, 30.0)):
            data = json.dumps(metrics_record(seq, 7200.0 + seq, rss, 1)["data"])
            conn.execute(
                schema.records.insert().values(
                    device_id="old-1", seq=seq, ts=7200.0 + seq, kind="metrics", data=data, received_at=0
                )
            )
    first.close()
    store = TelemetryStore.open(db_url)
    q = SeriesQuery("rss_mb", 7200, 10800, 3600, "avg", devices=("old-1",))
    assert FleetQueries(store.engine).series(q) == [{"t": 7200, "value": 20.0}]
    store.close()


def test_prune_from_the_command_line(tmp_path: Path) -> None:
    db = str(tmp_path / "fleet.sqlite3")
    store = TelemetryStore.open(db)
    old = time.time() - 9 * 86_400
    put_records(store, "gh-9", [metrics_record(1, old, 1, 1), metrics_record(2, time.time(), 1, 1)])
    store.close()
    done = cli("telemetry", "prune", "--db", db, "--raw-days", "7")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["records_pruned"] == 1
    refused = cli("telemetry", "prune", "--db", db, "--raw-days", "0.1")
    assert refused.returncode == 2 and "error [bad_retention]" in refused.stderr


def test_prometheus_metrics(
    api: tuple[TestClient, dict[str, str], dict[str, str]], fleet: TelemetryStore
) -> None:
    client, read, _ = api
    put_records(fleet, "gh-1", [metrics_record(5, time.time(), 1, 1)])
    client.get("/api/v1/devices", headers=read)
    text = client.get("/metrics").text
    assert 'edge_fleet_gaps{state="open"} 1.0' in text
    assert "edge_fleet_rollup_backlog_records 1.0" in text
    assert (
        'edge_fleet_api_request_seconds_count{method="GET",route="/api/v1/devices",status="200"} 1.0' in text
    )


def test_series_query_bounds() -> None:
    with pytest.raises(Exception, match="step"):
        SeriesQuery("rss_mb", 0, 10_000_000, 1)


# ---------------------------------------------------------------- end to end: broker -> service -> CLI


def test_service_ingests_from_the_broker_and_the_cli_reads_it(
    broker: LocalBroker,
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    tokens, read, _ = tokens_file(tmp_path)
    token_file = tmp_path / "read.token"
    token_file.write_text(read + "\n")
    prefix, group = (
        f"e2e-{uuid.uuid4().hex[:8]}",
        f"svc-{uuid.uuid4().hex[:8]}",
    )  # apart from other tests' topics
    common = [
        "--db",
        pg_url,
        "--broker",
        broker.url,
        "--group",
        group,
        "--topic-prefix",
        prefix,
        "--roll-every",
        "0.5",
    ]
    services = [
        ServiceProcess([*common, "--client-id", f"{group}-{n}", "--tokens", str(tokens)]) for n in (1, 2)
    ]
    devices = {
        "e2e-north": (["aarch64", "aarch64-no-dotprod"], ["greenhouse", "site=north"]),
        "e2e-south": (["aarch64", "aarch64-dotprod"], ["greenhouse", "site=south"]),
        "e2e-lab": (["x86_64"], ["lab"]),
    }
    publisher = Publisher(broker.port)
    try:
        for service in services:
            service.wait_ready()
        now = time.time()
        for i, (dev, (hardware, tags)) in enumerate(devices.items()):
            doc = status_doc(dev, hardware=hardware, tags=tags)
            publisher.publish(f"{prefix}/{dev}/status", doc, retain=True)
            for s in (1, 2, 3):  # one record a message: the two services share them
                record = metrics_record(s, now - 300 + 60 * s, 100 * (i + 1) + s, 50.0 * s)
                publisher.publish(f"{prefix}/{dev}/telemetry", telemetry_doc(dev, [record]))
        service = services[1]
        api = ["--api", service.url, "--token-file", str(token_file)]

        def listed() -> bool:
            out = cli("devices", *api, "--json")
            return out.returncode == 0 and len(json.loads(out.stdout)["devices"]) == 3

        wait_until(listed, 20, "three devices in the API")
        table = cli("devices", *api, "--selector", "hardware=aarch64,tag=site=north")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.strip().splitlines()
        assert lines[0].split()[:3] == ["DEVICE", "STATE", "PACK"] and len(lines) == 2
        assert lines[1].split()[:3] == ["e2e-north", "online", "tiny@0.0.1"]
        lab = ["device", "show", "e2e-lab", *api]
        # the two services share the messages: until both stored theirs, a seq may be an open gap
        wait_until(lambda: "gaps       none" in cli(*lab).stdout, 10, "e2e-lab's records all stored")
        detail = cli(*lab)
        assert "x86_64" in detail.stdout and "(max seq 3)" in detail.stdout, detail.stdout + detail.stderr
        north = ["device", "show", "e2e-north", *api]
        wait_until(lambda: '"rss_mb": 103' in cli(*north).stdout, 10, "the last record")
        series = cli(
            "metrics",
            *api,
            "--metric",
            "rss_mb",
            "--selector",
            "tag=greenhouse",
            "--since",
            "1h",
            "--step",
            "1h",
            "--agg",
            "max",
            "--json",
        )
        assert (
            series.returncode == 0
            and series.stdout
            and json.loads(series.stdout)["points"][-1]["value"] == 203.0
        )
        bad = cli("devices", *api, "--selector", "colour=red")
        assert bad.returncode == 2 and "error [bad_selector]" in bad.stderr
        wrong = tmp_path / "wrong.token"
        wrong.write_text("nope\n")
        denied = cli("devices", "--api", service.url, "--token-file", str(wrong))
        assert denied.returncode == 2 and "error [unauthorized]" in denied.stderr

        def stored() -> list[float]:
            return [scrape(s.url, "edge_fleet_ingest_records_total") for s in services]

        wait_until(lambda: sum(stored()) == 9, 10, "nine records stored between the two services")
        backlog = "edge_fleet_rollup_backlog_records"
        wait_until(lambda: scrape(service.url, backlog) == 0, 10, "the rollers to fold every record")
        assert scrape(service.url, "edge_fleet_db_write_seconds_count") >= stored()[1]
    finally:
        for dev in devices:
            publisher.publish(f"{prefix}/{dev}/status", b"", retain=True)  # clear the retained documents
        publisher.close()
        assert [s.stop() for s in services] == [0, 0], [s.logs[-5:] for s in services]


def test_the_api_over_https(tmp_path: Path) -> None:
    """--tls-cert/--tls-key: tokens never cross a network in clear; the client checks the CA."""
    pki = make_pki(tmp_path)
    tokens, read, _ = tokens_file(tmp_path)
    (tmp_path / "read.token").write_text(read)
    db = str(tmp_path / "fleet.sqlite3")
    store = TelemetryStore.open(db)
    put_status(store, "tls-1", hardware=["x86_64"], tags=["lab"])
    store.close()
    tls = ["--tls-cert", f"{pki['server']}.pem", "--tls-key", f"{pki['server']}.key"]
    service = ServiceProcess(
        ["--db", db, "--api-only", "--tokens", str(tokens), *tls], ca=Path(f"{pki['ca']}.pem")
    )
    try:
        service.wait_ready()
        api = ["--api", service.url, "--token-file", str(tmp_path / "read.token")]
        ok = cli("devices", *api, "--api-ca", f"{pki['ca']}.pem", "--selector", "tag=lab")
        assert ok.returncode == 0 and ok.stdout.splitlines()[1].startswith("tls-1"), ok.stderr
        untrusted = cli("devices", *api)  # the system's CAs do not know the test CA
        assert untrusted.returncode == 2 and "error [unreachable]" in untrusted.stderr
    finally:
        assert service.stop() == 0, service.logs[-5:]


def scrape(url: str, name: str) -> float:
    """One unlabelled sample from a Prometheus text page."""
    with urllib.request.urlopen(f"{url}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in {url}/metrics")
