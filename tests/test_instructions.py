"""Privileged actions must be authentic: signed by an operator key the device trusts, for this
device, never replayed. Attack tests over a real broker against a running agent (tiny pack),
plus the format and the replay ledger on their own."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from agent.authority import Authority, ReplayLedger
from agent.errors import Replayed
from agent.localbroker import LocalBroker
from model_packs import instructions
from tests.conftest import RunningAgent, agent_config
from tests.operators import Operator, default_operator


def _reload(signed: dict[str, Any]) -> dict[str, Any]:
    return {**signed, "cmd": "reload"}


def test_a_signed_reload_for_this_device_is_acted_on_once(running_agent: RunningAgent) -> None:
    signed = _reload(default_operator().sign("reload", running_agent.cfg.device_id))
    with running_agent.client(client="ops") as ops:
        assert ops.request("cmd", signed, 30)["type"] == "final"
        again = ops.request("cmd", signed, 30)  # captured off the broker and sent again
    assert again["code"] == "replayed" and "is not above" in again["message"]


def test_an_older_instruction_is_replayed_whatever_the_device_clock_says(running_agent: RunningAgent) -> None:
    device, op = running_agent.cfg.device_id, default_operator()
    newer = _reload(op.sign("reload", device, seq=2_000_000_000_000_000))
    older = _reload(op.sign("reload", device, seq=1_000_000_000_000_000))  # signed earlier, held back
    with running_agent.client(client="ops") as ops:
        assert ops.request("cmd", newer, 30)["type"] == "final"
        assert ops.request("cmd", older, 30)["code"] == "replayed"


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        ("unknown_key", "unauthorized"),
        ("other_device", "wrong_device"),
        ("tampered_body", "unauthorized"),
        ("signature_of_another_body", "unauthorized"),
        ("reload_signature_on_update", "unauthorized"),
        ("unsigned_claiming_fleet", "unauthorized"),
        ("garbage_base64", "unauthorized"),
    ],
)
def test_forged_and_misdirected_updates_are_refused_with_their_code(
    running_agent: RunningAgent, tmp_path: Path, attack: str, code: str
) -> None:
    device, op = running_agent.cfg.device_id, default_operator()
    fields = {"rollout_id": "r", "target": "tiny@9.9.9"}
    if attack == "unknown_key":
        body = Operator(tmp_path, "mallory").sign("update", device, **fields)
    elif attack == "other_device":
        body = op.sign("update", "greenhouse-other", **fields)
    elif attack == "tampered_body":
        body = op.sign("update", device, **fields)
        raw = json.loads(base64.b64decode(body["signed"]))
        raw["target"] = "tiny@6.6.6"
        body["signed"] = base64.b64encode(json.dumps(raw).encode()).decode()
    elif attack == "signature_of_another_body":
        body = op.sign("update", device, **fields)
        body["sig"] = op.sign("update", device, rollout_id="x", target="tiny@1.0.0")["sig"]
    elif attack == "reload_signature_on_update":
        body = op.sign("reload", device)
    elif attack == "unsigned_claiming_fleet":
        body = {**fields, "client": "fleet", "key": op.key_id}
    else:
        body = {**op.sign("update", device, **fields), "sig": "%%%not-base64%%%"}
    with running_agent.client(client="fleet") as fleet:
        reply = fleet.request("update", body, 30)
        assert reply["type"] == "error" and reply["code"] == code, reply
        assert fleet.request("cmd", {"cmd": "ping"}, 10)["type"] == "final"  # still serving


def test_a_device_that_trusts_no_operator_refuses_privileged_actions(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any
) -> None:
    ra = start_agent(agent_config(broker.url, tiny_pack_path, security={"operator_keys": []}), broker)
    signed = default_operator().sign("update", ra.cfg.device_id, rollout_id="r", target="tiny@1.0.0")
    with ra.client(client="fleet") as fleet:
        reply = fleet.request("update", signed, 30)
    assert reply["code"] == "forbidden" and "security.operator_keys" in reply["message"]


def test_the_ledger_survives_a_restart_and_a_damaged_one_refuses_to_start(tmp_path: Path) -> None:
    op = default_operator()
    keys = {op.key_id: op.key.public_key()}
    path = tmp_path / "instructions.json"
    Authority(keys, "d1", ReplayLedger(path)).check(op.sign("reload", "d1", seq=10), "reload")
    again = Authority(keys, "d1", ReplayLedger(path))  # a restart
    with pytest.raises(Replayed):
        again.check(op.sign("reload", "d1", seq=10), "reload")
    again.check(op.sign("reload", "d1", seq=11), "reload")
    path.write_text("{not json")
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match="unreadable"):
        ReplayLedger(path)


def test_the_envelope_signs_exact_bytes_and_names_its_key() -> None:
    op = default_operator()
    env = op.sign("update", "d1", target="tiny@1.0.0", rollout_id="r")
    ins = instructions.verify(env, {op.key_id: op.key.public_key()}, "update", "d1")
    assert ins.body["target"] == "tiny@1.0.0" and ins.key_id == op.key_id and ins.seq > 0
    with pytest.raises(instructions.InstructionRefused) as err:
        instructions.verify(env, {op.key_id: op.key.public_key()}, "update", "d2")
    assert err.value.code == "wrong_device"


def test_operator_keys_are_created_private_encrypted_and_never_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet.errors import RepositoryError
    from fleet.operators import create_operator_key, signing_key

    monkeypatch.setenv("EDGE_FLEET_KEY_PASSPHRASE", "correct horse")
    private, public, kid = create_operator_key(tmp_path, "fleet")
    assert private.stat().st_mode & 0o077 == 0
    assert b"ENCRYPTED" in private.read_bytes()
    key = signing_key(private)
    assert (
        instructions.key_id(key.public_key())
        == kid
        == instructions.key_id(instructions.load_public_key(public))
    )
    with pytest.raises(RepositoryError, match="never overwritten"):
        create_operator_key(tmp_path, "fleet")
    monkeypatch.setenv("EDGE_FLEET_KEY_PASSPHRASE", "wrong")
    with pytest.raises(RepositoryError, match="cannot use signing key"):
        signing_key(private)


def test_a_replayed_signed_update_is_refused(running_agent: RunningAgent) -> None:
    """The update topic goes through the same ledger: a captured instruction sent again is
    `replayed` (the first was authentic; this agent has no repository, so it was refused
    after the check with bad_request)."""
    signed = default_operator().sign(
        "update", running_agent.cfg.device_id, rollout_id="r", target="tiny@0.0.2"
    )
    with running_agent.client(client="fleet") as fleet:
        first = fleet.request("update", signed, 30)
        again = fleet.request("update", signed, 30)
    assert first["code"] == "bad_request" and "repository_url" in first["message"]
    assert again["code"] == "replayed"
