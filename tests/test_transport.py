"""The MQTT wrapper itself, against a real mosquitto: properties, sessions, fail-fast connects.

The daemon's side of it (reconnect with backoff, last will, TLS) is covered through the
agent in test_agent_runtime.py; these tests cover what the operator side relies on.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import MqttConfig, ReconnectConfig
from agent.localbroker import LocalBroker, free_port
from agent.transport import MqttError, MqttTransport


def _transport(
    url: str,
    *topics: str,
    protocol: str = "5",
    persistent: bool = False,
    client_id: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> MqttTransport:
    config = MqttConfig(
        url=url, protocol=protocol, username=username, password=password, reconnect=ReconnectConfig(0.1, 0.5)
    )
    return MqttTransport(config, client_id or f"t-{uuid.uuid4().hex[:8]}", topics, persistent=persistent)


def _topic() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def connected(broker: LocalBroker) -> Iterator[list[MqttTransport]]:
    """Transports a test connects; all are stopped when it ends."""
    opened: list[MqttTransport] = []
    yield opened
    for t in opened:
        t.stop()


def _open(opened: list[MqttTransport], t: MqttTransport) -> MqttTransport:
    t.connect(10)
    opened.append(t)
    return t


def test_publish_carries_the_mqtt5_properties(broker: LocalBroker, connected: list[MqttTransport]) -> None:
    topic = _topic()
    listener = _open(connected, _transport(broker.url, topic))
    sender = _open(connected, _transport(broker.url))
    sender.publish(
        topic,
        b"\x00payload",
        correlation_data=b"\x00\x01corr",
        response_topic="ops/replies",
        user_properties={"client": "ops"},
        wait_s=5,
    )
    got = listener.inbox.get(timeout=10)
    assert (got.topic, got.payload, got.correlation_data) == (topic, b"\x00payload", b"\x00\x01corr")
    assert got.response_topic == "ops/replies" and got.user_properties == {"client": "ops"}
    assert got.v5 and not got.retain


def test_a_retained_message_reaches_a_later_subscriber_marked_retained(
    broker: LocalBroker, connected: list[MqttTransport]
) -> None:
    topic = _topic()
    _open(connected, _transport(broker.url)).publish(topic, b"birth", retain=True, wait_s=5)
    late = _open(connected, _transport(broker.url, topic))
    got = late.inbox.get(timeout=10)
    assert got.payload == b"birth" and got.retain


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("persistent", [True, False])
def test_only_a_persistent_session_keeps_what_was_sent_while_away(
    broker: LocalBroker, connected: list[MqttTransport], protocol: str, persistent: bool
) -> None:
    topic, cid = _topic(), f"away-{uuid.uuid4().hex[:8]}"
    first = _transport(broker.url, topic, protocol=protocol, persistent=persistent, client_id=cid)
    first.connect(10)
    first.stop()
    sender = _open(connected, _transport(broker.url))
    sender.publish(topic, b"while away", wait_s=5)
    back = _transport(broker.url, topic, protocol=protocol, persistent=persistent, client_id=cid)
    _open(connected, back)
    sender.publish(topic, b"after", wait_s=5)  # QoS 1 from one sender keeps its order
    got = back.inbox.get(timeout=10).payload
    assert got == (b"while away" if persistent else b"after")


def test_connect_raises_when_nothing_listens() -> None:
    t = _transport(f"mqtt://127.0.0.1:{free_port()}")
    with pytest.raises(MqttError) as err:
        t.connect(10)
    assert err.value.code == "unreachable" and "cannot reach the broker" in err.value.message


def test_a_broker_that_cannot_be_reached_is_logged_once_then_counted_and_found_later(tmp_path: Path) -> None:
    """start() retries in the background: the first failed attempt is a warning naming the
    broker, the next ones only count (debug lines); a broker that comes up is connected to."""
    import structlog

    port = free_port()
    t = _transport(f"mqtt://127.0.0.1:{port}")
    with structlog.testing.capture_logs() as logs:
        t.start()
        try:
            deadline = time.monotonic() + 10
            while t.connect_failures < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert t.connect_failures >= 3
            warned = [e for e in logs if e["event"] == "mqtt_connect_failed" and e["log_level"] == "warning"]
            assert len(warned) == 1 and warned[0]["broker"] == f"127.0.0.1:{port}"
            broker = LocalBroker(port=port, workdir=tmp_path).start()
            try:
                assert t.wait_connected(15) and t.connect_failures == 0
            finally:
                broker.stop()
        finally:
            t.stop()


def test_connect_is_refused_with_a_wrong_password(tmp_path: Path) -> None:
    pwfile = tmp_path / "passwords"
    pwfile.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "ops", "right"], check=True)
    (tmp_path / "broker").mkdir()
    with LocalBroker(workdir=tmp_path / "broker", listener_conf=f"password_file {pwfile}\n") as broker:
        wrong = _transport(broker.url, _topic(), username="ops", password="wrong")
        with pytest.raises(MqttError) as err:
            wrong.connect(10)
        assert err.value.code == "refused"
        right = _transport(broker.url, _topic(), username="ops", password="right")
        right.connect(10)
        assert right.subscribed.is_set()
        right.stop()


def test_a_clean_session_subscribes_again_after_a_broker_restart(tmp_path: Path) -> None:
    """A restarted broker has no clean session left: the subscription must be renewed."""
    topic, reconnected = _topic(), threading.Event()
    broker = LocalBroker(workdir=tmp_path).start()

    def on_connect() -> None:  # runs after the SUBSCRIBEs went out, before their SUBACKs
        if t.connects > 1:
            reconnected.set()

    config = MqttConfig(url=broker.url, reconnect=ReconnectConfig(0.1, 0.5))
    t = MqttTransport(config, "resub", [topic], on_connect=on_connect, persistent=False)
    try:
        t.connect(10)
        broker.stop(kill=True)
        broker.start()
        assert reconnected.wait(15), "no reconnect after the broker came back"
        assert t.subscribed.wait(10), "the subscription was not renewed"
        sender = _transport(broker.url)
        sender.connect(10)
        sender.publish(topic, b"still here", wait_s=5)
        sender.stop()
        assert t.inbox.get(timeout=10).payload == b"still here"
    finally:
        t.stop()
        broker.stop()


def test_waiting_for_the_puback_fails_loudly_when_not_connected() -> None:
    t = _transport(f"mqtt://127.0.0.1:{free_port()}")  # never connected
    with pytest.raises(MqttError):
        t.publish(_topic(), b"lost", wait_s=1)


def test_a_bounded_inbox_drops_and_counts_a_flood(
    broker: LocalBroker, connected: list[MqttTransport]
) -> None:
    topic = _topic()
    listener = MqttTransport(
        MqttConfig(url=broker.url), f"t-{uuid.uuid4().hex[:8]}", [topic], persistent=False, inbox_size=5
    )
    _open(connected, listener)
    sender = _open(connected, _transport(broker.url))
    for i in range(40):
        sender.publish(topic, str(i).encode(), wait_s=5)
    marker = _open(connected, _transport(broker.url, f"{topic}/done"))
    sender.publish(f"{topic}/done", b"x", wait_s=5)  # the listener's messages were sent before this
    marker.inbox.get(timeout=10)
    deadline = time.monotonic() + 10
    while listener.dropped + listener.inbox.qsize() < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listener.inbox.qsize() == 5 and listener.dropped == 35


def test_a_publish_the_broker_refuses_is_counted_not_taken_for_delivered(tmp_path: Path) -> None:
    """MQTT 5 PUBACK with "not authorized" (an ACL denial): seen, counted, logged."""
    pwfile, acl = tmp_path / "passwd", tmp_path / "acl"
    pwfile.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "dev", "pw"], check=True)
    acl.write_text("user dev\ntopic readwrite allowed/#\n")
    (tmp_path / "broker").mkdir()
    broker = LocalBroker(
        workdir=tmp_path / "broker", listener_conf=f"password_file {pwfile}\nacl_file {acl}\n"
    )
    broker.start()
    t = _transport(broker.url, username="dev", password="pw")
    try:
        t.connect(10)
        t.publish("allowed/x", b"ok", wait_s=5)
        with pytest.raises(MqttError, match="refused a publish to forbidden/x"):
            t.publish("forbidden/x", b"no", wait_s=5)  # acknowledged, with a failure reason
        assert t.publish_refused == 1
        t.publish("forbidden/x", b"no")  # not waited for: counted, never raised
        deadline = time.monotonic() + 5
        while t.publish_refused < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert t.publish_refused == 2
    finally:
        t.stop()
        broker.stop()


def test_the_local_broker_is_out_of_reach_of_a_ctrl_c_in_our_terminal(tmp_path: Path) -> None:
    """make demo's broker runs in its own session: the SIGINT a terminal sends to our process
    group does not kill it under the live agent; the demo stops it last."""
    import os

    with LocalBroker(workdir=tmp_path) as broker:
        assert broker.proc is not None
        assert os.getsid(broker.proc.pid) != os.getsid(0)
        assert os.getpgid(broker.proc.pid) != os.getpgid(0)
