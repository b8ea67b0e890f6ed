"""Identity on a shared broker: provisioned devices and operators authenticate, the ACL follows
the authenticated username (never the client id a client picks), a revoked device is out.
A real mosquitto with the password file and ACL that edge-fleet writes, a real agent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import config_from_mapping
from agent.localbroker import LocalBroker
from agent.transport.client import RequestClient
from fleet import devices
from fleet.repository import FleetRepository
from fleet.rollouts.sender import Publisher, Refusal
from fleet.telemetry.ingest import IngestConfig, IngestWorker
from fleet.telemetry.store import TelemetryStore
from tests.conftest import RunningAgent
from tests.operators import default_operator


def _fleet(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout.splitlines()[0])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A fleet repository, two provisioned devices, an operator login, the broker with both files."""
    d = tmp_path_factory.mktemp("site")
    repo = FleetRepository(d / "repo", d / "keys")
    repo.init()
    passwd, acl = d / "passwd", d / "acl"
    broker = LocalBroker(listener_conf=f"password_file {passwd}\nacl_file {acl}\n")
    out = {}
    for device in ("gh-1", "gh-2"):
        pub = str(default_operator().pub)
        _fleet(
            "device", "provision", device, "--repo", str(repo.dir), "--operator-key", pub,
            "--broker", broker.url, "--passwd", str(passwd), "--out", str(d / "devices"),
        )  # fmt: skip
        out[device] = yaml.safe_load((d / "devices" / device / "agent.yaml").read_text())
    ops = _fleet("broker", "user", "ops", "--passwd", str(passwd))
    _fleet("broker", "acl", "--out", str(acl), "--operator", "ops")
    with broker:
        yield {"broker": broker, "devices": out, "ops": ops["password"], "passwd": passwd, "dir": d}


def _agent(site: dict[str, Any], device: str, pack: Path, start_agent: Any) -> RunningAgent:
    data = site["devices"][device]
    data["pack"] = {"path": str(pack), "threads": 1}
    data["sensors"] = [{"name": "temperature", "unit": "°C"}]
    data["state_dir"] = str(site["dir"] / f"state-{device}-{time.monotonic_ns()}")
    data["security"] = {"operator_keys": [str(default_operator().pub)]}  # the provisioned copy, in place
    data["updates"] = {}
    ra: RunningAgent = start_agent(config_from_mapping(data, env={}), site["broker"])
    return ra


def _connect(site: dict[str, Any], user: str | None, password: str | None) -> tuple[mqtt.Client, Any]:
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
    )
    if user:
        c.username_pw_set(user, password)
    result: dict[str, Any] = {}
    c.on_connect = lambda cl, u, f, rc, p: result.setdefault("rc", rc)
    c.connect("127.0.0.1", site["broker"].port)
    c.loop_start()
    deadline = time.monotonic() + 5
    while "rc" not in result and time.monotonic() < deadline:
        time.sleep(0.02)
    return c, result.get("rc")


def test_provisioning_writes_a_private_config_with_its_own_login(site: dict[str, Any]) -> None:
    d = site["dir"] / "devices" / "gh-1"
    assert (d / "agent.yaml").stat().st_mode & 0o077 == 0 and (
        d / "mqtt-password"
    ).stat().st_mode & 0o077 == 0
    cfg = site["devices"]["gh-1"]
    assert (
        cfg["mqtt"]["username"] == "gh-1"
        and cfg["mqtt"]["password"] != site["devices"]["gh-2"]["mqtt"]["password"]
    )
    assert (d / "root.json").exists() and (d / "operators" / default_operator().pub.name).exists()
    assert "gh-1:$7$101$" in site["passwd"].read_text()


def test_anonymous_and_wrong_password_clients_are_refused(site: dict[str, Any]) -> None:
    for user, password in ((None, None), ("gh-1", "guess")):
        c, rc = _connect(site, user, password)
        c.loop_stop()
        assert rc is not None and rc.is_failure, (user, rc)


def test_a_device_cannot_write_into_another_devices_tree(
    site: dict[str, Any], tiny_pack_path: Path, start_agent: Any
) -> None:
    ra = _agent(site, "gh-1", tiny_pack_path, start_agent)
    gh2 = site["devices"]["gh-2"]["mqtt"]
    c, rc = _connect(site, "gh-2", gh2["password"])
    assert rc is not None and not rc.is_failure
    info = c.publish("edge/gh-1/sensors/temperature", b"99.5", qos=1)  # spoofed reading
    info.wait_for_publish(5)
    c.publish("edge/gh-2/sensors/temperature", b"12.0", qos=1).wait_for_publish(5)  # its own: allowed
    c.loop_stop()
    c.disconnect()
    with RequestClient(site["broker"].url, "gh-1", client="ops", username="ops", password=site["ops"]) as ops:
        time.sleep(0.3)
        read = ops.request("read", {"sensor": "temperature"}, 10)
        ping = ops.request("cmd", {"cmd": "ping"}, 10)
    assert read["value"] is None, read  # the broker dropped gh-2's write to gh-1's sensor
    assert ping["type"] == "final"  # while the operator, by its login, may ask
    assert ra.agent.hub.read("temperature", "last", 3600).value is None


def test_an_operator_cannot_read_another_users_replies(
    site: dict[str, Any], tiny_pack_path: Path, start_agent: Any
) -> None:
    _agent(site, "gh-1", tiny_pack_path, start_agent)
    c, _ = _connect(site, "gh-2", site["devices"]["gh-2"]["mqtt"]["password"])
    seen: list[str] = []
    c.on_message = lambda cl, u, m: seen.append(m.topic)
    c.subscribe("edge-ops/#", qos=1)  # mosquitto grants it, then delivers only what the ACL allows
    time.sleep(0.3)
    with RequestClient(site["broker"].url, "gh-1", client="ops", username="ops", password=site["ops"]) as ops:
        assert ops.reply_topic.startswith("edge-ops/ops/")
        assert ops.request("cmd", {"cmd": "ping"}, 10)["type"] == "final"
    time.sleep(0.3)
    c.loop_stop()
    assert not [t for t in seen if t.startswith("edge-ops/ops/")], seen


def test_the_ingest_login_reads_telemetry_and_acks_it_and_a_device_cannot_ack_for_another(
    site: dict[str, Any], tiny_pack_path: Path, start_agent: Any, tmp_path: Path
) -> None:
    """The fleet's ingest login (``write_acl(..., ingest=[...])``) takes the devices' telemetry
    through its shared subscription and writes the retained ack into the device's tree; the
    device (its own tree, readwrite) takes it; another device's forged ack never arrives."""
    passwd, acl, broker = site["passwd"], site["dir"] / "acl", site["broker"]
    before = passwd.read_text(), acl.read_text()
    store = TelemetryStore.open(str(tmp_path / "fleet.sqlite3"))
    devices.add_user(passwd, "fleet", "fleet-pw")
    devices.write_acl(acl, ["ops"], ingest=["fleet"])
    broker.proc.send_signal(1)  # SIGHUP: mosquitto reloads both files
    time.sleep(0.5)
    cfg = IngestConfig(broker.url, "acl-test", "acl-w1", username="fleet", password="fleet-pw")
    worker = IngestWorker(cfg, store, retry_max_s=0.5)
    try:
        worker.start()
        assert worker.subscribed.wait(10)
        ra = _agent(site, "gh-1", tiny_pack_path, start_agent)  # its boot record goes out at once
        assert ra.agent.telemetry is not None
        spool = ra.agent.telemetry.spool
        deadline = time.monotonic() + 20
        while spool.marks().acked_through < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert spool.marks().acked_through >= 1 and store.record_count("gh-1") >= 1
        c, _ = _connect(site, "gh-2", site["devices"]["gh-2"]["mqtt"]["password"])
        forged = json.dumps({"v": 1, "through_seq": 10**6}).encode()
        c.publish("edge/gh-1/telemetry/ack", forged, qos=1, retain=True).wait_for_publish(5)
        time.sleep(0.5)
        c.loop_stop()
        assert "ahead" not in ra.agent.telemetry.acks  # the broker dropped gh-2's write
    finally:
        worker.stop()
        store.close()
        clear, _ = _connect(site, "fleet", "fleet-pw")  # the retained ack: gone for later tests
        clear.publish("edge/gh-1/telemetry/ack", b"", qos=1, retain=True).wait_for_publish(5)
        clear.loop_stop()
        passwd.write_text(before[0])
        acl.write_text(before[1])
        broker.proc.send_signal(1)
        time.sleep(0.3)


def test_a_revoked_device_cannot_connect(site: dict[str, Any]) -> None:
    passwd = site["passwd"]
    entries_before = passwd.read_text()
    try:
        _fleet("device", "revoke", "gh-2", "--passwd", str(passwd))
        site["broker"].proc.send_signal(1)  # SIGHUP: mosquitto reloads its password file
        time.sleep(0.5)
        c, rc = _connect(site, "gh-2", site["devices"]["gh-2"]["mqtt"]["password"])
        c.loop_stop()
        assert rc is not None and rc.is_failure
        with pytest.raises(Exception, match="revoked"):
            devices.add_user(passwd, "gh-2", "x")  # a new identity under that id is deliberate (--force)
    finally:
        passwd.write_text(entries_before)
        site["broker"].proc.send_signal(1)


def test_the_shipped_device_broker_config_refuses_anonymous_and_confines_by_username(
    tmp_path: Path,
) -> None:
    """deploy/mosquitto (docker-compose, balena) run as written, its /mosquitto paths moved here."""
    shipped = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
    conf = (shipped / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "acl_file" in conf
    passwd = tmp_path / "passwd"
    devices.add_user(passwd, "gh-9", "pw-9")
    lines = [
        ln
        for ln in conf.replace("/mosquitto/config/", f"{tmp_path}/").splitlines()
        if not ln.startswith(("listener", "persistence", "log_dest", "allow_anonymous"))
    ]
    (tmp_path / "acl").write_text((shipped / "acl").read_text())
    with LocalBroker(listener_conf="\n".join(lines) + "\n") as broker:
        site = {"broker": broker}
        c, rc = _connect(site, None, None)
        c.loop_stop()
        assert rc is not None and rc.is_failure
        c, rc = _connect(site, "gh-9", "pw-9")
        assert rc is not None and not rc.is_failure
        got: list[str] = []
        c.on_message = lambda cl, u, m: got.append(m.topic)
        c.subscribe("edge/#", qos=1)
        time.sleep(0.2)
        for topic in ("edge/gh-9/sensors/t", "edge/other/sensors/t"):
            c.publish(topic, b"1", qos=1).wait_for_publish(5)
        time.sleep(0.3)
        c.loop_stop()
        assert got == ["edge/gh-9/sensors/t"]


def test_the_fleet_login_sends_rollout_instructions_and_gets_the_replies_an_ingest_login_cannot(
    site: dict[str, Any], tiny_pack_path: Path, start_agent: Any
) -> None:
    """`edge-fleet broker acl --fleet NAME`: the service that drives rollouts writes update
    instructions and reads the devices' replies under edge-ops/NAME/; `--ingest NAME` may not
    write instructions at all (the broker drops them before any device sees them)."""
    passwd, acl, broker = site["passwd"], site["dir"] / "acl", site["broker"]
    before = passwd.read_text(), acl.read_text()
    devices.add_user(passwd, "fleet", "fleet-pw")
    devices.add_user(passwd, "reader", "reader-pw")
    _fleet("broker", "acl", "--out", str(acl), "--operator", "ops", "--fleet", "fleet", "--ingest", "reader")
    broker.proc.send_signal(1)  # SIGHUP: mosquitto reloads both files
    time.sleep(0.5)
    publishers = []
    try:
        _agent(site, "gh-1", tiny_pack_path, start_agent)
        refused: dict[str, list[Refusal]] = {}
        for user in ("fleet", "reader"):
            cfg = IngestConfig(broker.url, "acl-test", f"{user}-svc", username=user, password=f"{user}-pw")
            pub = Publisher(cfg, f"{user}-driver")
            pub.start()
            publishers.append(pub)
            assert pub.connected.wait(10)
            time.sleep(0.3)  # its SUBSCRIBE to the replies
            env = json.dumps(
                default_operator().sign("update", "gh-1", rollout_id=f"r-{user}", target="tiny@0.0.2")
            )
            assert pub.publish([("edge/gh-1/update", env, f"r-{user} gh-1")]) == [True]
            deadline = time.monotonic() + 3
            refused[user] = []
            while not refused[user] and time.monotonic() < deadline:
                refused[user] += pub.refusals()
                time.sleep(0.05)
        # the agent has no repository configured: it refuses, and says so to the sender
        assert [(r.rollout_id, r.device_id, r.code) for r in refused["fleet"]] == [
            ("r-fleet", "gh-1", "bad_request")
        ]
        assert refused["reader"] == []  # never delivered: nothing to answer
    finally:
        for pub in publishers:
            pub.stop()
        passwd.write_text(before[0])
        acl.write_text(before[1])
        broker.proc.send_signal(1)
        time.sleep(0.3)
