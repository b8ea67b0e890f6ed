"""The operator's first hour (issue 14): configuration errors all at once, broker addresses,
devices that are offline or misspelt, help texts, pipes, missing extras, trend units."""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config
from agent.errors import ConfigError
from agent.localbroker import LocalBroker
from agent.progress import Progress
from agent.sensors.windows import read_text
from agent.transport import MqttError
from agent.transport.client import RequestClient
from agent.transport.options import broker_url
from tests.conftest import RunningAgent, StatusWatcher, agent_config

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
        "  - {name: Bad}\n  - {name: f, source: {type: file}}\ntelemetry: {ack: nobody}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = err.value.message
    for key in (
        "bogus: unknown key",
        "sensors[0].max_age_s",
        "sensors[1].name: required key",
        "sensors[2].name: 'Bad' must be lowercase",  # checked although sensors[1] cannot be built
        "sensors[3].source.path: required for a file source",
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


# ---------------------------------------------------------------- progress and the last will


def _online(broker: LocalBroker, device: str) -> None:
    """A retained online status for a device no agent serves: its requests go unanswered."""
    with RequestClient(broker.url, device) as c:
        c.transport.publish(
            f"edge/{device}/status", json.dumps({"v": 1, "state": "online"}), retain=True, wait_s=5
        )


def _forget(broker: LocalBroker, device: str) -> None:
    with RequestClient(broker.url, device) as c:
        c.transport.publish(f"edge/{device}/status", b"", retain=True, wait_s=5)


def test_progress_is_drawn_on_a_terminal_and_cleared_before_the_error(broker: LocalBroker) -> None:
    device = f"slow-{uuid.uuid4().hex[:6]}"
    _online(broker, device)
    try:
        master, slave = pty.openpty()
        args = [
            "query",
            "--broker",
            broker.url,
            "--device",
            device,
            "--timeout",
            "1.5",
            "--json",
            "Is it warm?",
        ]
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=slave
        )
        os.close(slave)
        seen = b""
        while chunk := _read_pty(master):
            seen += chunk
        assert proc.wait(30) == 3
        os.close(master)
        text = seen.decode()
        assert re.search(rf"{device}: waiting for the answer, \d+\.\d s", text), text
        assert "\r\x1b[Kedge-agent: error [no_reply]: " in text, text  # the line was cleared first
        piped = _cli("agent.cli", *args)  # stderr captured: no progress line, only the error
        assert piped.returncode == 3 and piped.stderr.startswith("edge-agent: error [no_reply]: "), (
            piped.stderr
        )
        assert "waiting" not in piped.stderr and "\r" not in piped.stderr
    finally:
        _forget(broker, device)


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the other side closed
        return b""


def _daemon_config(tmp_path: Path, device: str, broker: LocalBroker, pack: Path, **extra: object) -> Path:
    """An `edge-agent run` config file: the private broker, the tiny pack, ``extra`` keys."""
    config = tmp_path / "agent.yaml"
    base = {
        "device_id": device,
        "mqtt": {"url": broker.url},
        "pack": {"path": str(pack), "threads": 1},
        "state_dir": str(tmp_path / "state"),
    }
    config.write_text(yaml.safe_dump({**base, **extra}))
    return config


def test_a_query_to_a_killed_agent_is_answered_from_its_last_will(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path
) -> None:
    device = f"killed-{uuid.uuid4().hex[:6]}"
    config = _daemon_config(tmp_path, device, broker, tiny_pack_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)], stderr=subprocess.DEVNULL
    )
    try:
        watcher = StatusWatcher(broker, f"edge/{device}/status")
        watcher.wait_state("online", 60)
        proc.kill()  # no clean stop: the broker publishes the will
        proc.wait(10)
        watcher.wait_state("offline")
        watcher.close()
        done = _cli("agent.cli", "query", "--broker", broker.url, "--device", device, "Is it warm?")
        assert done.returncode == 3, done.stderr
        assert f"[device_offline]: device '{device}' is offline (its last status, from " in done.stderr
    finally:
        proc.kill()
        _forget(broker, device)


# ---------------------------------------------------------------- help, pipes, missing extras


def _parsers() -> dict[str, argparse.ArgumentParser]:
    import agent.cli
    import fleet.cli
    import model_packs.cli

    return {
        "edge-agent": agent.cli._parser(),
        "edge-pack": model_packs.cli._parser(),
        "edge-fleet": fleet.cli._parser(),
    }


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)


def _undescribed(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's subcommands that have no help text in its listing."""
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {a.dest for a in action._choices_actions if a.help}
            out += sorted(set(action.choices) - described)
    return out


@pytest.mark.parametrize("prog", ["edge-agent", "edge-pack", "edge-fleet"])
def test_help_has_no_markup_and_every_subcommand_is_described(prog: str) -> None:
    parsers = list(_walk(_parsers()[prog]))
    assert len(parsers) > 3
    for parser in parsers:
        assert _undescribed(parser) == [], parser.prog
        text = parser.format_help()
        assert "`" not in text and ":class:" not in text, text


def test_read_help_shows_the_choices_syntax_and_defaults() -> None:
    done = _cli("agent.cli", "read", "--help")
    text = " ".join(done.stdout.split())  # argparse wraps to the terminal's width
    assert done.returncode == 0
    assert "--agg {last,mean,min,max,count,trend}" in text and "default: last" in text
    assert "--window DURATION" in text and "(30s, 5m, 1h)" in text
    assert "--timeout SECONDS" in text and "(default: 120)" in text
    assert "default: mqtt://127.0.0.1:1883" in text


def _into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout on a pipe whose reader has already gone, as under ``| head`` once
    head has its lines: every write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, *argv],
            cwd=ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_ends_quietly_in_all_three_clis(
    tiny_pack_path: Path, tmp_path: Path
) -> None:
    runs = {
        "edge-pack inspect": ["-m", "model_packs.cli", "inspect", str(tiny_pack_path)],
        "edge-agent ask": [
            "-m",
            "agent.cli",
            "ask",
            "--pack",
            str(tiny_pack_path),
            "--max-tokens",
            "4",
            "hi",
        ],
        "edge-fleet token add": [
            "-m",
            "fleet.cli",
            "token",
            "add",
            "--role",
            "read",
            "--tokens",
            str(tmp_path / "t"),
        ],
        "edge-agent --help": ["-m", "agent.cli", "read", "--help"],
        "edge-pack --help": ["-m", "model_packs.cli", "--help"],
        "edge-fleet --help": ["-m", "fleet.cli", "--help"],
    }
    for name, argv in runs.items():
        done = _into_closed_pipe(*argv)
        assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr, (name, done.stderr)
        assert done.returncode in (0, 141), (name, done.returncode, done.stderr)


def test_edge_pack_build_without_the_build_extra_names_the_extra() -> None:
    """A device install: gguf and onnx are not there (blocked here as an import would find them missing)."""
    block = "import sys; sys.modules['gguf'] = None; sys.modules['onnx'] = None; "
    run = "from model_packs.cli import main; sys.exit(main(['build', '--name', 'x']))"
    done = subprocess.run(
        [sys.executable, "-c", block + run], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        "edge-pack: error [missing_extra]: this command needs the 'build' extra ("
    ), done.stderr
    assert "pip install 'edge-slm-agent[build]'" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- reads as a person reads them


def test_read_prints_a_trend_in_the_sensors_unit_per_minute_and_no_reading_plainly(
    running_agent: RunningAgent,
) -> None:
    now = time.time()
    for age, value in ((120, 20.0), (60, 21.0), (0, 22.0)):  # one degree a minute
        running_agent.publish("sensors/temperature", json.dumps({"value": value, "ts": now - age}))
    with running_agent.client() as c:
        deadline = time.monotonic() + 30
        while c.request("read", {"sensor": "temperature", "agg": "count"}, 30)["value"] < 3:
            assert time.monotonic() < deadline, "the readings never arrived"
            time.sleep(0.05)
    target = ["--broker", running_agent.broker.url, "--device", running_agent.cfg.device_id]
    trend = _cli("agent.cli", "read", *target, "--sensor", "temperature", "--agg", "trend")
    assert trend.returncode == 0, trend.stderr
    assert re.match(
        r"temperature trend over 1h: \+(0\.99\d*|1|1\.0\d*) °C per minute   \[round trip", trend.stdout
    ), trend.stdout
    count = _cli("agent.cli", "read", *target, "--sensor", "temperature", "--agg", "count", "--window", "1h")
    assert count.stdout.startswith("temperature count over 1h: 3 readings   "), count.stdout
    empty = _cli("agent.cli", "read", *target, "--sensor", "humidity", "--window", "10m")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.startswith("humidity: no reading in the last 10m   "), empty.stdout
    flat = _cli("agent.cli", "read", *target, "--sensor", "humidity", "--agg", "trend")
    assert flat.stdout.startswith("humidity trend over 1h: no trend, fewer than two readings in that time"), (
        flat.stdout
    )


def test_read_text_says_how_old_a_stale_reading_is() -> None:
    fact = {
        "sensor": "t",
        "value": 21.5,
        "unit": "°C",
        "ts": 1000.0,
        "stale": True,
        "agg": "last",
        "window": "1h",
    }
    assert read_text(fact, now=1300.0) == "t last over 1h: 21.5 °C (stale: the newest reading is 5 min old)"
    assert read_text({**fact, "agg": "trend", "value": -0.855, "unit": "%"}, now=1030) == (
        "t trend over 1h: -0.855 % per minute (stale: the newest reading is 30 s old)"
    )


# ---------------------------------------------------------------- the daemon's log


def _sensor(client: RequestClient, name: str) -> dict[str, Any]:
    status = client.request("cmd", {"cmd": "status"}, 30)["result"]
    found: dict[str, Any] = next(s for s in status["sensors"] if s["sensor"] == name)
    return found


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_an_unreadable_sensor_warns_once_per_run_and_a_clean_stop_logs_no_warning_else(
    broker: LocalBroker, tiny_pack_path: Path, tmp_path: Path
) -> None:
    """The sample config's cpu_temp off a Pi: its sysfs file is not there, every poll fails."""
    device = f"nopi-{uuid.uuid4().hex[:6]}"
    thermal = tmp_path / "thermal_zone0" / "temp"  # absent at first, as off a Pi
    source = {"type": "file", "path": str(thermal), "scale": 0.001, "interval_s": 0.05}
    config = _daemon_config(
        tmp_path,
        device,
        broker,
        tiny_pack_path,
        log_level="info",
        sensors=[{"name": "cpu_temp", "unit": "°C", "source": source}],
        limits={"rate": {"per_s": 1000.0, "burst": 1000}},  # status is polled below
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)], stderr=subprocess.PIPE, text=True
    )
    watcher = StatusWatcher(broker, f"edge/{device}/status")
    try:
        watcher.wait_state("online", 60)
        with RequestClient(broker.url, device) as c:
            _until(lambda: _sensor(c, "cpu_temp")["rejected"] >= 10, "ten failed polls")
            thermal.parent.mkdir()
            thermal.write_text("48312\n")
            _until(lambda: _sensor(c, "cpu_temp")["accepted"] >= 1, "the sensor read again")
            thermal.unlink()
            before = _sensor(c, "cpu_temp")["rejected"]
            _until(lambda: _sensor(c, "cpu_temp")["rejected"] >= before + 5, "the second run of failures")
            counted = _sensor(c, "cpu_temp")["rejected_by_reason"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        watcher.close()
        _forget(broker, device)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    warnings = [e for e in events if e["level"] in ("warning", "error", "critical")]
    assert [e["event"] for e in warnings] == ["bad_reading", "bad_reading"], warnings  # one per run
    assert all(e["sensor"] == "cpu_temp" and "No such file" in e["reason"] for e in warnings), warnings
    assert counted["source"] >= before + 5  # every failure still counted (cmd status)
    assert [e["event"] for e in events if e["event"] == "sensor_reading_again"] == ["sensor_reading_again"]
    assert "mqtt_closed" in [e["event"] for e in events]  # the clean stop, at info


def test_the_progress_line_gives_way_for_good_to_streamed_text() -> None:
    screen = io.StringIO()
    with Progress("greenhouse-1", screen, enabled=True, period_s=0.01) as progress:
        _until(lambda: "waiting for the answer" in screen.getvalue(), "a progress frame")
        progress.chunk(text_shown=True)
        after = screen.getvalue()
        assert after.endswith("\r\x1b[K")  # cleared before the text is printed
        time.sleep(0.1)  # ten periods: no frame may come back over the text
        assert screen.getvalue() == after
    hidden = io.StringIO()
    with Progress("greenhouse-1", hidden, enabled=False, period_s=0.01) as progress:
        progress.chunk(text_shown=False)
    assert hidden.getvalue() == "" and progress.chunks == 1
