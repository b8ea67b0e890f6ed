"""The operator's first hour (issue 14): configuration errors all at once, broker addresses,
devices that are offline or misspelt, help texts, pipes, missing extras, trend units."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.localbroker import LocalBroker
from agent.transport import MqttError
from agent.transport.client import RequestClient
from agent.transport.options import broker_url
from tests.conftest import RunningAgent, agent_config

ROOT = Path(__file__).resolve().parent.parent


def _cli(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- configuration errors

THREE_PROBLEMS = """\
device_id: greenhouse-1
mqtt: {url: 'http://broker:1883', keepalive_s: fast}
log_level: loud
"""


def test_every_configuration_problem_is_reported_each_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(THREE_PROBLEMS)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    lines = err.value.message.splitlines()
    assert lines[0] == "3 problems in the configuration:", lines
    keys = sorted(line.strip().split(":")[0] for line in lines[1:])
    assert keys == ["log_level", "mqtt.keepalive_s", "mqtt.url"], lines


def test_problems_in_a_list_and_unknown_keys_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "device_id: a\nbogus: 1\nsensors:\n  - {name: t, max_age_s: soon}\n  - {unit: C}\n"
        "telemetry: {ack: nobody}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = err.value.message
    for key in (
        "bogus: unknown key",
        "sensors[0].max_age_s",
        "sensors[1].name: required key",
        "telemetry.ack",
    ):
        assert f"  {key}" in message, message


def test_the_daemon_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(THREE_PROBLEMS)
    done = _cli("agent.cli", "run", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("edge-agent: error [bad_config]: 3 problems in the configuration:\n")
    for key in ("mqtt.url", "mqtt.keepalive_s", "log_level"):
        assert f"\n  {key}: " in done.stderr, done.stderr


# ---------------------------------------------------------------- offline or unknown devices


def test_a_query_to_an_unknown_device_is_refused_at_once_with_exit_3(broker: LocalBroker) -> None:
    target = ["--broker", broker.url, "--device", f"nobody-{uuid.uuid4().hex[:6]}", "--timeout", "60"]
    done = _cli("agent.cli", "query", *target, "Is it warm?")
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("edge-agent: error [unknown_device]: no device 'nobody-"), done.stderr
    assert "never published a status" in done.stderr and done.stdout == ""


def test_a_query_to_a_stopped_agent_says_since_when_it_is_offline(
    broker: LocalBroker, tiny_pack_path: Path
) -> None:
    cfg = agent_config(broker.url, tiny_pack_path)
    agent = RunningAgent(cfg, broker)
    target = ["--broker", broker.url, "--device", cfg.device_id, "--timeout", "60"]
    online = _cli("agent.cli", "cmd", "ping", *target, "--json")
    assert online.returncode == 0, online.stderr
    agent.stop()  # a clean stop leaves the retained offline document
    done = _cli("agent.cli", "query", *target, "Is it warm?")
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith(
        f"edge-agent: error [device_offline]: device '{cfg.device_id}' is offline"
    ), done.stderr
    assert re.search(r"its last status, from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, \d+ s ago", done.stderr), (
        done.stderr
    )
    forced = _cli("agent.cli", "read", *target, "--sensor", "t", "--timeout", "0.5", "--no-status-check")
    assert forced.returncode == 3 and "[no_reply]" in forced.stderr, forced.stderr


def test_a_device_going_offline_while_a_reply_is_awaited_ends_the_wait(broker: LocalBroker) -> None:
    """The broker publishes a device's last will live (not retained) to subscribers: a
    waiting operator learns from it that no reply will come."""
    device = f"dying-{uuid.uuid4().hex[:6]}"
    status = f"edge/{device}/status"
    with RequestClient(broker.url, device, client="owner") as owner:
        owner.transport.publish(status, json.dumps({"v": 1, "state": "online"}), retain=True, wait_s=5)
        with RequestClient(broker.url, device, watch_status=True) as client:
            assert (client.device_status(5) or {}).get("state") == "online"
            rid = client.send("read", {"sensor": "t"})
            owner.publish(status, json.dumps({"v": 1, "state": "offline", "device_id": device}))
            with pytest.raises(MqttError) as err:
                client.wait(rid, 60)
        owner.transport.publish(status, b"", retain=True, wait_s=5)  # nothing left retained
    assert err.value.code == "device_offline" and "went offline" in err.value.message


# ---------------------------------------------------------------- broker addresses


def test_a_broker_given_as_host_port_is_the_one_reached(broker: LocalBroker) -> None:
    """Before, ``127.0.0.1:PORT`` was taken for the default broker; the port here is the
    private broker's, so only a correctly parsed address finds the device (none) there."""
    target = ["--broker", f"127.0.0.1:{broker.port}", "--device", "nobody-here", "--timeout", "5"]
    done = _cli("agent.cli", "read", *target, "--sensor", "t")
    assert done.returncode == 3, done.stderr
    assert "[unknown_device]" in done.stderr and f"mqtt://127.0.0.1:{broker.port}" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("localhost", "a bare host needs mqtt://"),
        ("http://broker:1883", "scheme 'http' is not MQTT"),
        ("tcp://broker:1883", "scheme 'tcp' is not MQTT"),
        ("mqtt://user:pw@broker", "no credentials in the URL"),
        ("broker:99999", "the port must be 1-65535"),
        ("broker:0", "the port must be 1-65535"),
        ("mqtt://broker:1883/edge", "expected HOST:PORT"),
    ],
)
def test_a_bad_broker_address_is_refused_with_a_code_by_every_cli(value: str, why: str) -> None:
    for prog, module, args in (
        ("edge-agent", "agent.cli", ["cmd", "ping", "--device", "d1"]),
        (
            "edge-fleet",
            "fleet.cli",
            ["update", "send", "--device", "d1", "--target", "t@1.0.0", "--signing-key", "k"],
        ),
    ):
        done = _cli(module, *args, "--broker", value)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"{prog}: error [bad_broker]: --broker {value!r}: "), done.stderr
        assert why in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("127.0.0.1:1884", "mqtt://127.0.0.1:1884"),
        ("[::1]:1883", "mqtt://[::1]:1883"),
        ("mqtt://broker.lan", "mqtt://broker.lan"),
        ("mqtts://broker.lan:8884", "mqtts://broker.lan:8884"),
    ],
)
def test_broker_addresses_that_are_accepted(value: str, url: str) -> None:
    assert broker_url(value) == url
