"""The agent as a running service: broker restarts, last will, watchdog, config, sensors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.app import Agent
from agent.config import load_config
from agent.errors import ConfigError
from agent.localbroker import LocalBroker
from agent.notify import Notifier
from tests.conftest import RunningAgent, StatusWatcher, agent_config
from tests.operators import default_operator


def test_broker_restart_agent_reconnects_and_answers_everything(tiny_pack_path: Path, tmp_path: Path) -> None:
    broker = LocalBroker(workdir=tmp_path).start()
    ra = RunningAgent(agent_config(broker.url, tiny_pack_path), broker)
    watcher = StatusWatcher(broker, ra.cfg.topic("status"))
    try:
        assert watcher.wait_state("online")["pack"]["name"] == "tiny"
        with ra.client(persistent=True) as c:
            ids = [c.send("query", {"question": f"q{i}", "max_tokens": 40}) for i in range(6)]
            broker.stop()  # SIGTERM: mosquitto saves its sessions
            time.sleep(0.5)
            broker.start()
            replies = [c.wait(rid, 30) for rid in ids]
            assert all(r["type"] in ("final", "error") for r in replies)
            after = c.request("query", {"question": "still there?", "max_tokens": 4}, 30)
            assert after["type"] == "final"
            assert ra.agent.transport.connects >= 2  # answered after the restart: it reconnected
        watcher.close()
        watcher = StatusWatcher(broker, ra.cfg.topic("status"))  # a new subscriber sees the retained doc
        assert watcher.wait_state("online")["device_id"] == ra.cfg.device_id
    finally:
        watcher.close()
        ra.stop()
        broker.stop()


def _write_config(path: Path, broker: LocalBroker, pack: Path, device: str, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "device_id": device,
        "mqtt": {"url": broker.url},
        "pack": {"path": str(pack), "threads": 1},
        "prompt": {"system": "Be brief.", "max_tokens": 8},
        "sensors": [{"name": "temperature", "unit": "°C"}],
        "state_dir": str(path.parent / f"state-{device}"),
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _spawn(config: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_last_will_on_kill_and_offline_on_clean_stop(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path
) -> None:
    config = _write_config(tmp_path / "agent.yaml", broker, tiny_pack_path, "will-dev")
    watcher = StatusWatcher(broker, "edge/will-dev/status")
    try:
        proc = _spawn(config)
        watcher.wait_state("online", 30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        will = watcher.wait_state("offline")  # the broker sent the will
        assert will["device_id"] == "will-dev" and will["pack"]["name"] == "tiny"
        proc = _spawn(config)
        watcher.wait_state("online", 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert watcher.wait_state("offline")["device_id"] == "will-dev"  # published by the agent itself
    finally:
        watcher.close()


def test_sighup_reloads_the_config_like_systemctl_reload(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path
) -> None:
    """`systemctl reload` sends SIGHUP (ExecReload in the unit): the running daemon re-reads
    its config and pack, keeps serving, and says so in its log."""
    config = _write_config(tmp_path / "agent.yaml", broker, tiny_pack_path, "hup-dev", log_level="info")
    watcher = StatusWatcher(broker, "edge/hup-dev/status")
    proc = _spawn(config)
    try:
        watcher.wait_state("online", 30)
        data = yaml.safe_load(config.read_text())
        data["prompt"]["max_tokens"] = 3
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            seen.append(line)
            if '"reloaded"' in line:
                break
        event = json.loads(seen[-1])
        assert event["trigger"] == "SIGHUP" and event["pack"]["name"] == "tiny", seen[-5:]
        assert proc.poll() is None  # still running
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        watcher.close()


def test_watchdog_messages_on_a_real_notify_socket(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    agent = Agent(agent_config(broker.url, tiny_pack_path), notifier=Notifier(path, watchdog_usec=200_000))
    runner = threading.Thread(target=agent.run)
    runner.start()
    got: list[str] = []
    try:
        while sum(m.startswith("WATCHDOG=1") for m in got) < 4 or not any("READY=1" in m for m in got):
            got.append(sock.recv(4096).decode())
    finally:
        agent.stopping.set()
        runner.join(10)
        agent.stop()
        sock.close()
    ready = next(m for m in got if "READY=1" in m)
    assert "STATUS=serving tiny 0.0.1" in ready


def test_command_line_query_read_cmd(running_agent: RunningAgent) -> None:
    running_agent.publish("sensors/temperature", "23.25")
    time.sleep(0.2)
    base = [sys.executable, "-m", "agent.cli"]
    target = ["--broker", running_agent.broker.url, "--device", running_agent.cfg.device_id]
    read = subprocess.run(
        [*base, "read", *target, "--sensor", "temperature", "--agg", "max", "--window", "10m"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert read.returncode == 0 and "temperature max over 10m: 23.25 °C" in read.stdout
    query = subprocess.run(
        [*base, "query", *target, "--max-tokens", "6", "How warm is it?"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert query.returncode == 0, query.stderr
    assert '"sensor": "temperature"' in query.stdout and "usage" in query.stdout
    status = subprocess.run([*base, "cmd", *target, "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["pack"]["name"] == "tiny"
    bad = subprocess.run(
        [*base, "read", *target, "--sensor", "nope"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "unknown_sensor" in bad.stderr


def _reload(device: str) -> dict[str, Any]:
    return {**default_operator().sign("reload", device), "cmd": "reload"}


def test_reload_keeps_serving_and_is_privileged(running_agent: RunningAgent) -> None:
    with running_agent.client(client="ops") as ops:
        assert ops.request("cmd", {"cmd": "reload"}, 30)["code"] == "unauthorized"  # unsigned
        r = ops.request("cmd", _reload(running_agent.cfg.device_id), 30)
        assert r["type"] == "final" and r["result"]["pack"]["name"] == "tiny"
        assert ops.request("query", {"question": "ok?", "max_tokens": 3}, 30)["type"] == "final"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device_id: a\nmqtt: {urll: x}\n", "mqtt.urll: unknown key"),
        ("device_id: a\nmqtt: {keepalive_s: fast}\n", "mqtt.keepalive_s: expected an integer"),
        ("device_id: a\nmqtt: {url: 'http://x'}\n", "mqtt.url"),
        ("device_id: a\nmqtt: {ca_file: /nope/ca.pem}\n", "mqtt.ca_file: file /nope/ca.pem does not exist"),
        ("mqtt: {}\n", "device_id: required key is missing"),
        ("device_id: a\nsensors: [{name: t, source: {type: file}}]\n", "sensors[0].source.path: required"),
        ("device_id: a\nsensors: [{name: t, max_age_s: soon}]\n", "sensors[0].max_age_s"),
        ("device_id: a\nsensors: [{name: t}, {name: t}]\n", "defined twice"),
        ("device_id: [\n", "not valid YAML"),
        ("device_id: a\nlog_level: loud\n", "log_level: 'loud' must be"),
        ("device_id: a\nprompt: {temperature: 9}\n", "prompt.temperature: 9.0 must be within 0..5"),
        ("device_id: a\nreplies: {allowed_topics: ['a/#/b']}\n", "replies.allowed_topics[0]"),
        ("device_id: a\nlimits: {max_client_keys: 0}\n", "limits.max_client_keys: must be >= 1"),
        ("device_id: a\nprivileged_clients: [ops]\n", "privileged_clients was removed"),
        ("device_id: a\nsecurity: {operator_keys: [/nope.pub]}\n", "security.operator_keys: /nope.pub"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert message in err.value.message and err.value.code == "bad_config"


def test_config_durations_and_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "device_id: a\nlimits: {deadline_s: 2m}\nsensors: [{name: t, max_age_s: 90s, window_s: 1h}]\n"
    )
    cfg = load_config(
        path, env={"EDGE_AGENT_DEVICE_ID": "from-env", "EDGE_AGENT_MQTT_URL": "mqtt://10.0.0.5:1884"}
    )
    assert cfg.device_id == "from-env" and cfg.mqtt.port == 1884 and cfg.limits.deadline_s == 120.0
    assert cfg.sensors[0].max_age_s == 90.0 and cfg.sensors[0].window_s == 3600.0
    assert cfg.topic("query") == "edge/from-env/query"


def test_run_with_a_bad_config_exits_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: a\nunknown_thing: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "[bad_config]" in done.stderr and "unknown_thing" in done.stderr


def test_file_and_command_sensors_are_polled(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path, start_agent: Any
) -> None:
    zone = tmp_path / "thermal_zone0_temp"
    zone.write_text("48500\n")
    broken = tmp_path / "broken"
    broken.write_text("n/a\n")
    sensors = [
        {
            "name": "cpu_temp",
            "unit": "°C",
            "source": {"type": "file", "path": str(zone), "scale": 0.001, "interval_s": 0.05},
        },
        {"name": "uptime", "source": {"type": "command", "argv": ["echo", "42 s"], "interval_s": 0.05}},
        {"name": "broken", "source": {"type": "file", "path": str(broken), "interval_s": 0.05}},
        {
            "name": "slow",
            "source": {"type": "command", "argv": ["sleep", "5"], "timeout_s": 0.1, "interval_s": 0.05},
        },
    ]
    ra = start_agent(agent_config(broker.url, tiny_pack_path, sensors=sensors), broker)
    time.sleep(0.5)
    with ra.client() as c:
        assert c.request("read", {"sensor": "cpu_temp"}, 10)["value"] == pytest.approx(48.5)
        assert c.request("read", {"sensor": "uptime"}, 10)["value"] == 42.0
        status = {s["sensor"]: s for s in c.request("cmd", {"cmd": "status"}, 10)["result"]["sensors"]}
    assert status["broken"]["rejected"] >= 1 and status["broken"]["accepted"] == 0
    assert status["slow"]["rejected"] >= 1 and status["slow"]["stale"] is True


def test_tls_with_client_certificate_and_password(tiny_pack_path: Path, tmp_path: Path) -> None:
    from tests.certs import make_pki

    pki = make_pki(tmp_path)
    pwfile = tmp_path / "passwords"
    pwfile.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "agent", "s3cret"], check=True)
    conf = (
        f"cafile {pki['ca'].with_suffix('.pem')}\ncertfile {pki['server'].with_suffix('.pem')}\n"
        f"keyfile {pki['server'].with_suffix('.key')}\nrequire_certificate true\npassword_file {pwfile}\n"
    )
    (tmp_path / "broker").mkdir()
    broker = LocalBroker(workdir=tmp_path / "broker", listener_conf=conf).start()
    tls = {
        "ca_file": str(pki["ca"].with_suffix(".pem")),
        "cert_file": str(pki["client"].with_suffix(".pem")),
        "key_file": str(pki["client"].with_suffix(".key")),
    }
    try:
        good = agent_config(
            f"mqtts://localhost:{broker.port}",
            tiny_pack_path,
            mqtt={
                "url": f"mqtts://localhost:{broker.port}",
                "username": "agent",
                "password": "s3cret",
                **tls,
            },
        )
        agent = Agent(good)
        agent.start()
        try:
            assert agent.transport.wait_connected(10), "TLS connection with certificate and password failed"
        finally:
            agent.stop()
        wrong = agent_config(
            f"mqtts://localhost:{broker.port}",
            tiny_pack_path,
            mqtt={"url": f"mqtts://localhost:{broker.port}", "username": "agent", "password": "wrong", **tls},
        )
        refused = Agent(wrong)
        refused.start()
        try:
            assert not refused.transport.wait_connected(2), "a wrong password must not connect"
        finally:
            refused.stop()
    finally:
        broker.stop()


def test_reload_of_a_broken_pack_keeps_the_old_one_serving(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path, start_agent: Any
) -> None:
    import shutil

    pack = Path(shutil.copytree(tiny_pack_path, tmp_path / "pack"))
    keys = {"operator_keys": [str(default_operator().pub)]}
    config = _write_config(tmp_path / "agent.yaml", broker, pack, "reload-dev", security=keys)
    ra = start_agent(load_config(config, env={}), broker, config)
    # a new file, not a rewrite in place: the serving session maps the old one
    slot = ra.agent.store.active_path()
    assert slot is not None
    (slot / "weights.tmp").write_bytes(b"garbage")
    os.replace(slot / "weights.tmp", slot / "weights.bin")
    with ra.client(client="ops") as ops:
        r = ops.request("cmd", _reload("reload-dev"), 30)
        assert r["code"] == "model_unavailable" and "still serving tiny 0.0.1" in r["message"]
        assert "weights.bin" in r["message"]
        q = ops.request("query", {"question": "still ok?", "max_tokens": 3}, 30)
        assert q["type"] == "final" and q["pack"]["name"] == "tiny"


def test_reload_applies_the_prompt_and_lists_what_needs_a_restart(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path, start_agent: Any
) -> None:
    config = _write_config(
        tmp_path / "agent.yaml",
        broker,
        tiny_pack_path,
        "rl-dev",
        security={"operator_keys": [str(default_operator().pub)]},
    )
    ra = start_agent(load_config(config, env={}), broker, config)
    data = yaml.safe_load(config.read_text())
    data["prompt"]["max_tokens"] = 3
    data["limits"] = {"rate": {"per_s": 50.0}, "max_tokens": 64}
    data["sensors"].append({"name": "humidity", "unit": "%"})
    config.write_text(yaml.safe_dump(data))
    with ra.client(client="ops") as ops:
        result = ops.request("cmd", _reload("rl-dev"), 30)["result"]
        assert sorted(result["restart_needed_for"]) == ["limits.rate", "sensors"]
        answer = ops.request("query", {"question": "warm?"}, 30)
        assert answer["usage"]["completion_tokens"] <= 3  # the new prompt.max_tokens applies at once
        too_many = ops.request("query", {"question": "warm?", "max_tokens": 100}, 30)
        assert too_many["code"] == "too_large" and too_many["limit"] == 64  # and the new limits


@pytest.mark.realpack
def test_sigkill_mid_query_leaves_no_request_without_a_reply(
    broker: LocalBroker, real_pack_path: Path, tmp_path: Path
) -> None:
    """Accepted queries are journalled: after a kill the next start answers `interrupted`."""
    config = _write_config(tmp_path / "agent.yaml", broker, real_pack_path, "journal-dev")
    data = yaml.safe_load(config.read_text())
    data["prompt"]["max_tokens"] = 200
    config.write_text(yaml.safe_dump(data))
    watcher = StatusWatcher(broker, "edge/journal-dev/status")
    proc = _spawn(config)
    try:
        watcher.wait_state("online", 60)
        from agent.transport.client import RequestClient

        with RequestClient(broker.url, "journal-dev") as c:
            started = threading.Event()
            long_q = {"question": "Write a long story about a greenhouse.", "temperature": 1.0, "seed": 3}
            running = c.send("query", long_q)
            queued = c.send("query", {"question": "and then?", "max_tokens": 4})
            chunks: list[dict[str, Any]] = []

            def first_chunk(ch: dict[str, Any]) -> None:
                chunks.append(ch)
                started.set()
                if len(chunks) == 1:
                    proc.send_signal(signal.SIGKILL)  # mid-generation, the second one still queued

            with pytest.raises(Exception, match="no reply"):
                c.wait(running, 5, first_chunk)  # the agent died: nothing more comes ...
            assert started.is_set() and proc.wait(10) == -signal.SIGKILL
            proc = _spawn(config)  # ... until it starts again
            replies = [c.wait(rid, 60) for rid in (running, queued)]
        assert [r["code"] for r in replies] == ["interrupted", "interrupted"], replies
    finally:
        proc.kill()
        proc.wait(10)
        watcher.close()


def test_sensor_windows_survive_a_restart(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path, start_agent: Any
) -> None:
    """A read right after a restart is not "no reading" for sensors that reported before."""
    cfg = agent_config(broker.url, tiny_pack_path, state_dir=str(tmp_path / "state"))
    first = start_agent(cfg, broker)
    for v in ("20.5", "21.5"):
        first.publish("sensors/temperature", v)
    with first.client() as c:  # the readings are in (handled before this request)
        assert c.request("read", {"sensor": "temperature", "agg": "count"}, 10)["value"] == 2.0
    first.stop()
    assert (tmp_path / "state" / "sensors.json").exists()
    second = start_agent(cfg, broker)
    with second.client() as c:
        r = c.request("read", {"sensor": "temperature", "agg": "mean"}, 10)
    assert r["value"] == 21.0 and r["facts"][0]["stale"] is False
