"""Rollouts end to end: a real broker, simulated devices (fleet/simulator) that verify every
signed instruction and answer with a real agent's update events, the real ingest worker and
store, the rollout driver with its real publisher, and the API to start and steer them."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.localbroker import LocalBroker
from fleet.simulator.config import Shares
from fleet.simulator.fleet import Fleet
from tests.fleet_api_support import ServiceProcess, cli, tokens_file
from tests.operators import Operator, default_operator
from tests.rollout_support import FleetService, sim_config, wait_for
from tests.test_fleet_telemetry import pg_database, pg_url  # noqa: F401  (fixtures)


@pytest.fixture()
def prefix() -> str:
    return f"ro{uuid.uuid4().hex[:6]}"


@pytest.fixture()
def service(broker: LocalBroker, tmp_path: Path, prefix: str) -> Iterator[FleetService]:
    s = FleetService(broker.url, str(tmp_path / "fleet.sqlite3"), tmp_path, prefix)
    yield s
    s.close()


def instructed(sim: Fleet, rollout_id: str) -> dict[str, int]:
    """Verified instructions of this rollout each device received."""
    return {
        v.id: v.counters.rollouts.get(rollout_id, 0)
        for v in sim.devices()
        if v.counters.rollouts.get(rollout_id)
    }


def test_a_failing_canary_halts_the_rollout_and_nothing_more_is_sent(
    broker: LocalBroker, service: FleetService, prefix: str
) -> None:
    with Fleet(sim_config(broker.url, prefix, 20, shares=Shares(fail=0.2))) as sim:
        failing = sim.with_fate("fail")[:2]
        canary = failing + [d for d in sim.ids if sim.fates[d] == "ok"][:8]  # 2 of 10 fail: 20 %
        service.devices_known(sim.ids)
        rid = service.start(canary=canary, waves="50%,100%", rules={"soak_s": 1})
        doc = service.wait(rid, lambda d: d["state"] != "running", 30)
        assert doc["state"] == "halted"
        halt = doc["halt"]
        assert (
            halt["rule"] == "failure_rate"
            and halt["wave"] == 0
            and sorted(halt["devices"]) == sorted(failing)
        )
        assert halt["figures"]["devices"] == 10 and halt["figures"]["failed"] >= 2
        assert "failed or rolled back" in halt["message"]
        time.sleep(2.0)  # the driver keeps ticking: a halted rollout sends nothing more
        assert set(instructed(sim, rid)) <= set(canary)
        states = service.device_states(rid)
        assert {states[d] for d in failing} == {"failed"}
        assert {states[d] for d in sim.ids if d not in canary} == {"pending"}
        assert service.doc(rid)["state"] == "halted"


def test_a_tokens_per_s_regression_halts_the_rollout(
    broker: LocalBroker, service: FleetService, prefix: str
) -> None:
    config = sim_config(broker.url, prefix, 8, shares=Shares(regress=1.0), regress_factor=0.5)
    with Fleet(config) as sim:
        service.devices_known(sim.ids)
        time.sleep(1.5)  # a few metrics records before the instruction: the devices' baseline
        rules = {"soak_s": 3, "min_samples": 2, "baseline_s": 60}
        rid = service.start(canary=sim.ids[:4], waves="100%", rules=rules)
        doc = service.wait(rid, lambda d: d["state"] != "running", 40)
        assert doc["state"] == "halted", doc
        halt = doc["halt"]
        assert halt["rule"] == "tokens_per_s" and halt["wave"] == 0
        assert set(halt["devices"]) <= set(sim.ids[:4]) and halt["figures"]["devices_judged"] >= 2
        assert len(halt["devices"]) == halt["figures"]["devices_judged"]  # every one judged got slower
        assert 0.4 <= halt["figures"]["median_ratio"] <= 0.6  # the simulator halves tokens/s
        assert set(instructed(sim, rid)) == set(sim.ids[:4])


def test_pause_resume_then_rollback(broker: LocalBroker, service: FleetService, prefix: str) -> None:
    with Fleet(sim_config(broker.url, prefix, 12, step_delay_s=0.2)) as sim:
        service.devices_known(sim.ids)
        rid = service.start(waves="25%,50%,100%", rules={"soak_s": 0.5})
        service.wait(rid, lambda d: d["waves"][0]["started_at"] is not None, 20)
        paused = service.act(rid, "pause")
        assert paused["state"] == "paused"
        sent = instructed(sim, rid)
        time.sleep(2.5)  # long enough for wave 0 to settle and its soak to end
        assert instructed(sim, rid) == sent, "a paused rollout sent instructions"
        assert len(sent) == 3 and service.doc(rid)["current_wave"] == 0
        service.act(rid, "resume")
        doc = service.wait(rid, lambda d: d["state"] == "completed", 40)
        assert doc["counts"] == {"confirmed": 12}
        assert instructed(sim, rid) == dict.fromkeys(sim.ids, 1)
        assert {v.pack["version"] for v in sim.devices()} == {"0.0.2"}
        service.act(rid, "rollback")
        doc = service.wait(rid, lambda d: d["state"] == "rolled_back", 40)
        assert {d.rb_state for d in service.rollouts.devices(rid)} == {"confirmed"}
        assert {v.pack["version"] for v in sim.devices()} == {"0.0.1"}
        assert instructed(sim, f"{rid}.rollback") == dict.fromkeys(sim.ids, 1)


def test_abort_stops_for_good(broker: LocalBroker, service: FleetService, prefix: str) -> None:
    with Fleet(sim_config(broker.url, prefix, 10)) as sim:
        service.devices_known(sim.ids)
        rid = service.start(waves="2,all", rules={"soak_s": 60})
        service.wait(rid, lambda d: d["waves"][0]["completed_at"] is not None, 20)
        doc = service.act(rid, "abort")
        assert doc["state"] == "aborted" and doc["counts"] == {"confirmed": 2, "aborted": 8}
        time.sleep(1.5)
        assert len(instructed(sim, rid)) == 2
        assert service.client.post(f"/api/v1/rollouts/{rid}/resume", headers=service.admin).status_code == 409


def test_devices_offline_when_their_wave_starts_are_updated_when_they_return(
    broker: LocalBroker, service: FleetService, prefix: str
) -> None:
    with Fleet(sim_config(broker.url, prefix, 10)) as sim:
        service.devices_known(sim.ids)
        away = sim.ids[:3]
        sim.take_offline(away)  # the broker publishes their wills: offline
        sim.wait_offline(away)
        time.sleep(1.0)
        rid = service.start(waves="100%", rules={"soak_s": 0.5})
        doc = service.wait(rid, lambda d: d["counts"].get("confirmed") == 7, 30)
        assert doc["counts"] == {"offline_waiting": 3, "confirmed": 7} and doc["state"] == "running"
        assert not set(instructed(sim, rid)) & set(away)
        sim.bring_online(away)
        doc = service.wait(rid, lambda d: d["state"] == "completed", 30)
        assert doc["counts"] == {"confirmed": 10}
        assert instructed(sim, rid) == dict.fromkeys(sim.ids, 1)


def test_the_driver_killed_mid_rollout_another_service_takes_over_without_a_duplicate(
    broker: LocalBroker,
    pg_url: str,  # noqa: F811
    tmp_path: Path,
    prefix: str,
) -> None:
    """Two `edge-fleet service` processes on one PostgreSQL and one broker, both with the
    signing key: one holds the rollout's lease; SIGKILL it mid-rollout and the other finishes
    the rollout, and every device acted on exactly one instruction of it."""
    tokens, _, admin = tokens_file(tmp_path)
    (tmp_path / "admin.token").write_text(admin)
    common = ["--db", pg_url, "--broker", broker.url, "--topic-prefix", prefix, "--group", f"g{prefix}"]
    driving = ["--signing-key", str(default_operator().private), "--lease", "2", "--driver-tick", "0.2"]
    services = {
        n: ServiceProcess([*common, *driving, "--client-id", f"{prefix}-svc{n}", "--tokens", str(tokens)])
        for n in (1, 2)
    }
    try:
        for s in services.values():
            s.wait_ready()
        with Fleet(sim_config(broker.url, prefix, 30, step_delay_s=0.15)) as sim:
            api = ["--api", services[1].url, "--token-file", str(tmp_path / "admin.token")]
            wait_for(lambda: _registry_size(services[1].url, admin) == 30, 30, "devices in the registry")
            started = cli(
                "rollout",
                "start",
                *api,
                "--target",
                "tiny@0.0.2",
                "--waves",
                "20%,60%,100%",
                "--soak",
                "0.5",
                "--json",
            )
            assert started.returncode == 0, started.stderr
            rid = json.loads(started.stdout)["id"]

            def doc() -> dict[str, Any]:
                alive = next(s for s in services.values() if s.proc.poll() is None)  # ask one that runs
                api = ["--api", alive.url, "--token-file", str(tmp_path / "admin.token")]
                shown = cli("rollout", "status", rid, *api, "--json")
                assert shown.returncode == 0, shown.stderr
                return dict(json.loads(shown.stdout))

            wait_for(lambda: doc()["current_wave"] >= 1, 30, "wave 1 to start")
            owner = doc()["driver"]["owner"]
            victim = next(n for n in services if owner.startswith(f"{prefix}-svc{n}-"))
            services[victim].proc.kill()  # SIGKILL: no lease released, maybe mid-publish
            services[victim].proc.wait(10)
            survivor = 3 - victim
            wait_for(lambda: doc()["state"] == "completed", 60, lambda: str(doc()))
            final = doc()
            assert final["counts"] == {"confirmed": 30}
            assert final["driver"]["owner"].startswith(f"{prefix}-svc{survivor}-")
            assert instructed(sim, rid) == dict.fromkeys(sim.ids, 1)  # acted on once, each
            api = ["--api", services[survivor].url, "--token-file", str(tmp_path / "admin.token")]
            text = cli("rollout", "status", rid, *api)
            assert "[completed]" in text.stdout and "confirmed 30" in text.stdout
    finally:
        for s in services.values():
            if s.proc.poll() is None:
                s.stop()


def _registry_size(url: str, token: str) -> int:
    request = urllib.request.Request(f"{url}/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return int(json.loads(r.read())["count"])


def test_devices_that_refuse_the_fleets_key_fail_at_once_with_the_reason(
    broker: LocalBroker, service: FleetService, prefix: str, tmp_path: Path
) -> None:
    """Devices provisioned with another operator key answer `unauthorized`; the driver reads
    that reply (its own response topic) instead of waiting for the response timeout."""
    stranger = Operator(tmp_path)
    with Fleet(sim_config(broker.url, prefix, 4, operator_keys=(stranger.pub,))) as sim:
        service.devices_known(sim.ids)
        rid = service.start(canary=sim.ids[:2], waves="100%")
        doc = service.wait(rid, lambda d: d["state"] != "running", 20)
        assert doc["state"] == "halted" and doc["halt"]["rule"] == "failure_rate"
        rows = service.rollouts.devices(rid)
        assert {(r.state, r.reason_code) for r in rows if r.wave == 0} == {("failed", "unauthorized")}
        assert all(r.reason and r.reason.startswith("refused: ") for r in rows if r.wave == 0)
        assert {v.id: v.counters.refusals["unauthorized"] for v in sim.devices()} == {
            d: 1 if d in sim.ids[:2] else 0 for d in sim.ids
        }
        assert sim.totals()["refusals"] == {"unauthorized": 2}


def test_a_refusal_forged_by_another_client_is_not_acted_on(
    broker: LocalBroker, service: FleetService, prefix: str
) -> None:
    """Any device may publish under edge-ops/ (it replies to operators there): a forged error
    reply naming a device on the driver's reply topic, without the instruction's random id,
    changes nothing; the device's own refusal (with it) is what counts (the test above)."""
    with Fleet(sim_config(broker.url, prefix, 3, step_delay_s=0.4)) as sim:
        service.devices_known(sim.ids)
        rid = service.start(waves="100%", rules={"soak_s": 0.5})
        service.wait(rid, lambda d: d["counts"].get("sent", 0) + d["counts"].get("downloading", 0) == 3, 20)
        forger = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        forger.connect("127.0.0.1", broker.port)
        forger.loop_start()
        try:
            for token in ("", "0123456789abcdef"):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = f"{rid} {sim.ids[0]} {token}".strip().encode()
                body = {
                    "v": 1,
                    "id": "x",
                    "type": "error",
                    "seq": 0,
                    "code": "unauthorized",
                    "message": "forged",
                }
                forger.publish(
                    service.publisher.replies_topic, json.dumps(body), 1, properties=props
                ).wait_for_publish(5)
        finally:
            forger.loop_stop()
            forger.disconnect()
        doc = service.wait(rid, lambda d: d["state"] != "running", 30)
        assert doc["state"] == "completed" and doc["counts"] == {"confirmed": 3}
