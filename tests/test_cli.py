"""The three command lines as a user runs them: one error printer, one set of exit statuses,
and the operator CLI through a TLS broker that wants a certificate and a password."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.localbroker import LocalBroker, free_port
from tests.conftest import agent_config
from tests.operators import default_operator

ROOT = Path(__file__).resolve().parent.parent


def _cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_edge_pack_error_is_printed_with_its_code_and_exits_2(tmp_path: Path) -> None:
    done = _cli("model_packs.cli", "verify", str(tmp_path))  # no manifest.json there
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("edge-pack: error [bad_manifest]: "), done.stderr


def test_edge_fleet_unreachable_broker_exits_3(tmp_path: Path) -> None:
    broker = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    key = str(default_operator().private)
    done = _cli(
        "fleet.cli", "update", "send", "--broker", broker, "--device", "d1", "--target", "tiny@0.0.2",
        "--signing-key", key,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("edge-fleet: error [unreachable]: cannot reach the broker"), done.stderr


def test_edge_agent_no_reply_exits_3(broker: LocalBroker) -> None:
    target = ["--broker", broker.url, "--device", "nobody-home", "--no-status-check"]  # else unknown_device
    done = _cli("agent.cli", "read", *target, "--sensor", "t", "--timeout", "0.5")
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("edge-agent: error [no_reply]: no reply to "), done.stderr


def test_edge_agent_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: d1\nmqtt: {url: 'http://nope'}\n")
    done = _cli("agent.cli", "run", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert "edge-agent: error [bad_config]: mqtt.url" in done.stderr, done.stderr


def _tls_broker(directory: Path) -> tuple[LocalBroker, dict[str, Path]]:
    """mosquitto on TLS only, requiring a client certificate and a username/password."""
    from tests.certs import make_pki

    pki = make_pki(directory)
    pwfile = directory / "passwords"
    pwfile.touch()
    for user, password in (("agent", "agent-pw"), ("operator", "operator-pw")):
        subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True)
    conf = (
        f"cafile {pki['ca'].with_suffix('.pem')}\ncertfile {pki['server'].with_suffix('.pem')}\n"
        f"keyfile {pki['server'].with_suffix('.key')}\nrequire_certificate true\npassword_file {pwfile}\n"
    )
    (directory / "broker").mkdir()
    return LocalBroker(workdir=directory / "broker", listener_conf=conf).start(), pki


def test_operator_cli_reaches_an_agent_through_tls_and_a_password(
    tiny_pack_path: Path, tmp_path: Path, start_agent: Any
) -> None:
    broker, pki = _tls_broker(tmp_path)
    url = f"mqtts://localhost:{broker.port}"
    tls = {
        "ca_file": str(pki["ca"].with_suffix(".pem")),
        "cert_file": str(pki["client"].with_suffix(".pem")),
        "key_file": str(pki["client"].with_suffix(".key")),
    }
    try:
        login = {"username": "agent", "password": "agent-pw"}
        cfg = agent_config(url, tiny_pack_path, mqtt={"url": url, **login, **tls})
        start_agent(cfg, broker)
        (tmp_path / "operator.pw").write_text("operator-pw\n")
        (tmp_path / "wrong.pw").write_text("guess\n")
        base = ["cmd", "ping", "--broker", url, "--device", cfg.device_id, "--username", "operator", "--json"]
        base += ["--ca-file", tls["ca_file"], "--cert-file", tls["cert_file"], "--key-file", tls["key_file"]]
        done = _cli("agent.cli", *base, "--password-file", str(tmp_path / "operator.pw"))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["type"] == "final"
        refused = _cli("agent.cli", *base, "--password-file", str(tmp_path / "wrong.pw"))
        assert refused.returncode == 3 and "edge-agent: error [refused]: " in refused.stderr, refused.stderr
    finally:
        broker.stop()
