"""Signed pack updates end to end: a real TUF repository on disk served over real HTTP.

Each attack must be refused with a clear reason while the active pack keeps working.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from agent import __version__
from agent.config import AgentConfig
from agent.inference import load_pack
from agent.localbroker import LocalBroker
from agent.packs.store import PackStore
from agent.packs.updater import PackUpdater, UpdateEvent, offline_updater, provision_trust
from agent.packs.verify import UpdateRejected
from fleet.errors import RepositoryError
from fleet.repository import FleetRepository
from fleet.serve import RangeHandler, make_server, serve_in_thread
from model_packs.format import verify_pack
from tests.conftest import StatusWatcher, agent_config
from tests.operators import default_operator


class FaultHandler(RangeHandler):
    """Serves the repository; a test can make target downloads misbehave."""

    fault: str | None = None
    ranges: list[str] = []  # noqa: RUF012 (shared on purpose: the test reads it)
    cut_after = 0

    def do_GET(self) -> None:
        if self.path.startswith("/targets/") and self.fault == "endless":
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\xaa" * 65536)
            except OSError:
                return
        if self.path.startswith("/targets/"):
            FaultHandler.ranges.append(self.headers.get("Range") or "")
        if self.path.startswith("/targets/") and self.fault == "cut_once":
            FaultHandler.fault = None
            f = self.send_head()
            if f:
                self.wfile.write(f.read(self.cut_after))
                f.close()
            self.close_connection = True
            return
        super().do_GET()


@dataclass
class Fleet:
    repo: FleetRepository
    url: str
    server: Any
    device: Path
    store: PackStore
    events: list[UpdateEvent] = field(default_factory=list)

    def updater(self, hook: Any = None) -> PackUpdater:
        return offline_updater(
            self.store, self.device / "tuf", self.url, __version__, on_event=self.events.append, hook=hook
        )

    def meta(self, role: str) -> Path:
        return self.repo.meta_dir / f"{role}.json"


@pytest.fixture()
def fleet(tmp_path: Path, tiny_versions: dict[str, Path]) -> Iterator[Fleet]:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(tiny_versions["0.0.2"])
    FaultHandler.fault, FaultHandler.ranges = None, []
    server = make_server(repo.dir, port=0, handler=FaultHandler)
    serve_in_thread(server)
    device = tmp_path / "device"
    store = PackStore(device)
    store.seed(tiny_versions["0.0.1"], "tiny@0.0.1")
    provision_trust(device / "tuf", repo.meta_dir / "1.root.json")
    yield Fleet(repo, f"http://127.0.0.1:{server.server_address[1]}", server, device, store)
    server.shutdown()


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="a full disk is a tmpfs the test mounts: needs root"
)


def _served_tar(repo_dir: Path, version: str) -> Path:
    """The file a device downloads for tiny@VERSION (hash-prefixed under consistent snapshots)."""
    name = re.compile(rf"([0-9a-f]{{64}}\.)?{re.escape(version)}\.tar")
    (found,) = [p for p in (repo_dir / "targets/packs/tiny").iterdir() if name.fullmatch(p.name)]
    return found


def _forge_targets(repo_dir: Path) -> None:
    """Re-sign the targets metadata a reader fetches with a key nobody trusts."""
    plain = repo_dir / "metadata/targets.json"
    md = Metadata.from_file(str(plain))
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    for path in (plain, repo_dir / f"metadata/{md.signed.version}.targets.json"):
        md.to_file(str(path), JSONSerializer())


def _refused(f: Fleet, target: str, reason: str) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as err:
        f.updater().install(target)
    assert err.value.reason_code == reason, err.value.message
    assert f.store.active_version() == "0.0.1"
    load_pack(f.store.active_path())  # type: ignore[arg-type]  # the old pack still loads
    assert f.events[-1].state == "rejected" and f.events[-1].reason_code == reason
    return err.value


def test_install_over_http(fleet: Fleet) -> None:
    path = fleet.updater().install("tiny@0.0.2")
    assert verify_pack(path).version == "0.0.2" and fleet.store.active_version() == "0.0.2"
    states = [e.state for e in fleet.events]
    assert states[0] == "downloading"
    assert [s for s in states if s != "downloading"] == ["verifying", "staged", "activated"]
    assert fleet.events[[e.state for e in fleet.events].index("verifying") - 1].percent == 100.0
    st = fleet.store.state()
    assert st.versions[st.previous] == "tiny@0.0.1" and st.trial  # previous kept; first probe pending


def test_tampered_file(fleet: Fleet) -> None:
    tar = _served_tar(fleet.repo.dir, "0.0.2")
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    _refused(fleet, "tiny@0.0.2", "hash_mismatch")


def test_unknown_key(fleet: Fleet) -> None:
    md = Metadata.from_file(str(fleet.meta("targets")))
    md.signed.version += 1
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    md.to_file(str(fleet.meta("targets")), JSONSerializer())
    fleet.repo.republish_snapshot()
    _refused(fleet, "tiny@0.0.2", "bad_signature")


def test_root_below_threshold(fleet: Fleet) -> None:
    md = Metadata.from_file(str(fleet.meta("root")))
    md.signed.version += 1
    signers = fleet.repo.keys.signers("root", md.signed)
    md.signatures.clear()
    md.sign(signers[0])  # 1 of the 2 needed
    md.to_file(str(fleet.repo.meta_dir / "2.root.json"), JSONSerializer())
    _refused(fleet, "tiny@0.0.2", "bad_signature")


def test_downgrade_refused_on_device_and_in_the_fleet(fleet: Fleet, tiny_versions: dict[str, Path]) -> None:
    fleet.repo.publish(tiny_versions["0.0.3"])
    fleet.updater().install("tiny@0.0.3")
    with pytest.raises(UpdateRejected) as err:
        fleet.updater().install("tiny@0.0.2")  # a signed target, but lower and not signed as a rollback
    assert err.value.reason_code == "downgrade" and fleet.store.active_version() == "0.0.3"
    with pytest.raises(RepositoryError, match="versions only go up"):
        fleet.repo.publish(tiny_versions["0.0.1"])


def test_signed_rollback_instruction_allows_going_back(fleet: Fleet, tiny_versions: dict[str, Path]) -> None:
    fleet.repo.publish(tiny_versions["0.0.3"])
    fleet.updater().install("tiny@0.0.3")
    fleet.repo.publish(tiny_versions["0.0.2"], rollback=True)
    fleet.updater().install("tiny@0.0.2")
    assert fleet.store.active_version() == "0.0.2"


def test_replayed_metadata(fleet: Fleet, tiny_versions: dict[str, Path]) -> None:
    old_timestamp = fleet.meta("timestamp").read_bytes()
    old_snapshot = fleet.meta("snapshot").read_bytes()
    fleet.repo.publish(tiny_versions["0.0.3"])
    fleet.updater().install("tiny@0.0.3")  # the device has now seen the newer metadata
    fleet.meta("timestamp").write_bytes(old_timestamp)
    fleet.meta("snapshot").write_bytes(old_snapshot)
    with pytest.raises(UpdateRejected) as err:
        fleet.updater().install("tiny@0.0.4")
    assert err.value.reason_code == "replayed_metadata"
    assert fleet.store.active_version() == "0.0.3"


def test_expired_metadata(fleet: Fleet) -> None:
    stale = FleetRepository(
        fleet.repo.dir, fleet.repo.keys.dir, clock=lambda: datetime.now(UTC) - timedelta(days=3)
    )
    stale.refresh_timestamp()
    _refused(fleet, "tiny@0.0.2", "expired_metadata")


def test_mix_and_match(fleet: Fleet, tiny_versions: dict[str, Path], tmp_path: Path) -> None:
    other = FleetRepository(tmp_path / "other", tmp_path / "other-keys")
    other.init()
    other.publish(tiny_versions["0.0.3"])
    shutil.copyfile(_served_tar(other.dir, "0.0.3"), _served_tar(fleet.repo.dir, "0.0.2"))
    _refused(fleet, "tiny@0.0.2", "hash_mismatch")


def test_endless_data_stops_at_the_signed_length(fleet: Fleet) -> None:
    FaultHandler.fault = "endless"
    sizes: list[int] = []
    part = fleet.store.downloads / "tiny-0.0.2.tar.part"

    def hook(stage: str) -> None:
        if stage == "verify":
            sizes.append(part.stat().st_size)

    with pytest.raises(UpdateRejected) as err:
        fleet.updater(hook).install("tiny@0.0.2")
    assert err.value.reason_code == "hash_mismatch"
    length = json.loads(fleet.meta("targets").read_text())["signed"]["targets"]["packs/tiny/0.0.2.tar"][
        "length"
    ]
    assert sizes == [length] and not part.exists()


def test_key_rotation(fleet: Fleet, tiny_versions: dict[str, Path]) -> None:
    old_md = Metadata.from_file(str(fleet.meta("root")))
    old_signer = fleet.repo.keys.signers("targets", old_md.signed)[0]
    fleet.repo.rotate("targets")
    fleet.updater().install("tiny@0.0.2")  # new key accepted through the signed root chain
    fleet.repo.publish(tiny_versions["0.0.3"])
    md = Metadata.from_file(str(fleet.meta("targets")))
    md.signed.version += 1
    md.signatures.clear()
    md.sign(old_signer)  # the old key alone
    md.to_file(str(fleet.meta("targets")), JSONSerializer())
    fleet.repo.republish_snapshot()
    with pytest.raises(UpdateRejected) as err:
        fleet.updater().install("tiny@0.0.3")
    assert err.value.reason_code == "bad_signature" and fleet.store.active_version() == "0.0.2"


def test_interrupted_download_resumes(fleet: Fleet) -> None:
    FaultHandler.fault, FaultHandler.cut_after = "cut_once", 5000
    with pytest.raises(UpdateRejected) as err:
        fleet.updater().install("tiny@0.0.2")
    assert err.value.reason_code == "download_interrupted"
    assert (fleet.store.downloads / "tiny-0.0.2.tar.part").stat().st_size == 5000
    fleet.updater().install("tiny@0.0.2")
    assert FaultHandler.ranges[-1] == "bytes=5000-" and fleet.store.active_version() == "0.0.2"


def test_pack_failing_the_health_gate_is_never_activated(
    fleet: Fleet, tiny_versions: dict[str, Path], tmp_path: Path
) -> None:
    bad = Path(shutil.copytree(tiny_versions["0.0.3"], tmp_path / "bad"))
    manifest = json.loads((bad / "manifest.json").read_text())
    for g in manifest["golden"]:
        g["token_ids"] = [(t + 1) % 50 for t in g["token_ids"]]  # outputs this pack will not reproduce
    (bad / "manifest.json").write_text(json.dumps(manifest))
    fleet.repo.publish(bad)
    err = _refused(fleet, "tiny@0.0.3", "health_gate")
    assert "golden prompt" in err.message
    assert fleet.store.state().last_outcome["reason_code"] == "health_gate"


@needs_root
def test_disk_full_while_downloading_cleans_up(fleet: Fleet) -> None:
    target = fleet.store.downloads
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"mounting a tmpfs failed: {done.stderr!r}")
    try:
        _refused(fleet, "tiny@0.0.2", "disk_full")
        assert list(target.iterdir()) == []
    finally:
        subprocess.run(["umount", str(target)], check=True)


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from agent import __version__
from agent.packs.store import PackStore
from agent.packs.updater import offline_updater
stage, device, url = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
def hook(s):
    if s == stage:
        os.kill(os.getpid(), signal.SIGKILL)
offline_updater(PackStore(device), device / "tuf", url, __version__, hook=hook).install("tiny@0.0.2")
"""


@pytest.mark.parametrize("stage", ["download", "verify", "stage", "health", "switch"])
def test_sigkill_at_each_stage_leaves_one_complete_pack_and_converges(fleet: Fleet, stage: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, stage, str(fleet.device), fleet.url], timeout=120
    )
    assert done.returncode == -9
    store = PackStore(fleet.device)
    store.converge()
    assert store.active_version() == "0.0.1"  # every kill point is before the switch
    verify_pack(store.active_path())  # type: ignore[arg-type]
    assert not store.staging.exists()
    offline_updater(store, fleet.device / "tuf", fleet.url, __version__).install("tiny@0.0.2")
    assert store.active_version() == "0.0.2"


def test_switch_leaves_the_new_pack_on_trial_and_rollback_restores_the_old(fleet: Fleet) -> None:
    fleet.updater().install("tiny@0.0.2")
    store = PackStore(fleet.device)
    store.converge()
    st = store.state()
    assert store.active_version() == "0.0.2" and st.trial
    verify_pack(store.active_path())  # type: ignore[arg-type]
    assert store.rollback("first health probe failed")
    assert store.active_version() == "0.0.1" and store.state().last_outcome["state"] == "rolled_back"


def test_publish_and_serve_from_the_command_line(tmp_path: Path, tiny_versions: dict[str, Path]) -> None:
    base = [sys.executable, "-m", "fleet.cli"]
    repo, keys = str(tmp_path / "repo"), str(tmp_path / "keys")
    secret = {**os.environ, "EDGE_FLEET_ROOT_PASSPHRASE": "test only"}
    init = [*base, "repo", "init", "--repo", repo, "--keys", keys]
    assert subprocess.run(init, timeout=60, env=secret).returncode == 0
    pub = subprocess.run(
        [*base, "pack", "publish", str(tiny_versions["0.0.2"]), "--repo", repo, "--keys", keys],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pub.returncode == 0 and json.loads(pub.stdout)["target"] == "packs/tiny/0.0.2.tar"
    again = subprocess.run(
        [*base, "pack", "publish", str(tiny_versions["0.0.1"]), "--repo", repo, "--keys", keys],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "versions only go up" in again.stderr
    key_files = list((tmp_path / "keys").rglob("*.pem"))
    assert len(key_files) == 6 and all(p.stat().st_mode & 0o077 == 0 for p in key_files)
    assert (tmp_path / "keys" / "root").stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------- through the running agent


def _updates_config(broker: LocalBroker, fleet: Fleet, seed: Path) -> AgentConfig:
    return agent_config(
        broker.url,
        seed,
        state_dir=str(fleet.device),
        updates={"repository_url": fleet.url, "trusted_root": str(fleet.repo.meta_dir / "1.root.json")},
    )


def test_update_instruction_over_mqtt_reaches_a_running_agent(
    broker: LocalBroker, fleet: Fleet, tiny_versions: dict[str, Path], start_agent: Any
) -> None:
    ra = start_agent(_updates_config(broker, fleet, tiny_versions["0.0.1"]), broker)
    events: list[dict[str, Any]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: events.append(json.loads(m.payload))
    watcher.on_connect = lambda c, u, f, r, p: c.subscribe(ra.cfg.topic("update/status"), qos=1)
    watcher.connect("127.0.0.1", broker.port)
    watcher.loop_start()
    try:
        time.sleep(0.3)
        with ra.client(client="operator") as op:
            denied = op.request("update", {"rollout_id": "r0", "target": "tiny@0.0.2"}, 10)
            assert denied["code"] == "unauthorized"  # unsigned: whatever client it claims to be
        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "fleet.cli",
                "update",
                "send",
                "--broker",
                broker.url,
                "--device",
                ra.cfg.device_id,
                "--target",
                "tiny@0.0.2",
                "--signing-key",
                str(default_operator().private),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["reply"]["result"] == {"update": "started"}
        with ra.client(client="fleet") as fl:
            ra.agent.updates.join(60)  # the install thread has finished
            answer = fl.request("query", {"question": "temperature?", "max_tokens": 3}, 30)
            status = fl.request("cmd", {"cmd": "status"}, 10)["result"]
        states = [e["state"] for e in events]
        assert "downloading" in states and states[-3:] == ["verifying", "staged", "activated"]
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert len({e["rollout_id"] for e in events}) == 1
        assert answer["pack"] == {"name": "tiny", "version": "0.0.2"}
        assert status["packs"]["active"] == "tiny@0.0.2" and status["packs"]["previous"] == "tiny@0.0.1"
        assert status["packs"]["last_update"]["state"] == "activated"
    finally:
        watcher.loop_stop()
        watcher.disconnect()


def test_pack_failing_its_first_probe_after_activation_is_rolled_back(
    broker: LocalBroker, fleet: Fleet, tiny_versions: dict[str, Path], tmp_path: Path, start_agent: Any
) -> None:
    bad = Path(shutil.copytree(tiny_versions["0.0.3"], tmp_path / "bad"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["golden"][0]["token_ids"] = [(t + 1) % 50 for t in manifest["golden"][0]["token_ids"]]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    staging = fleet.store.fresh_staging()
    for p in bad.iterdir():
        shutil.copy2(p, staging / p.name)
    fleet.store.activate_staged("tiny@0.0.3")  # as if the switch had just happened
    ra = start_agent(_updates_config(broker, fleet, tiny_versions["0.0.1"]), broker)
    with ra.client() as c:
        status = c.request("cmd", {"cmd": "status"}, 10)["result"]
        answer = c.request("query", {"question": "ok?", "max_tokens": 3}, 30)
    assert status["packs"]["active"] == "tiny@0.0.1"
    assert status["packs"]["last_update"]["state"] == "rolled_back"
    assert "golden prompt" in status["packs"]["last_update"]["reason"]
    assert answer["pack"]["version"] == "0.0.1"


def test_crash_loop_on_trial_rolls_back(
    broker: LocalBroker, fleet: Fleet, tiny_versions: dict[str, Path], start_agent: Any
) -> None:
    fleet.updater().install("tiny@0.0.2")
    for _ in range(3):
        fleet.store.note_boot()  # three starts that died before the first health probe
    start_agent(_updates_config(broker, fleet, tiny_versions["0.0.1"]), broker)
    st = fleet.store.state()
    assert st.versions[st.active or ""] == "tiny@0.0.1"
    assert "crash loop" in st.last_outcome["reason"]


def test_sideload_from_a_local_copy_of_the_repository(
    fleet: Fleet, tiny_versions: dict[str, Path], tmp_path: Path
) -> None:
    fleet.repo.publish(tiny_versions["0.0.3"])
    usb = Path(shutil.copytree(fleet.repo.dir, tmp_path / "usb"))
    config = tmp_path / "agent.yaml"
    config.write_text(
        json.dumps(
            {
                "device_id": "side",
                "state_dir": str(fleet.device),
                "updates": {"trusted_root": str(fleet.repo.meta_dir / "1.root.json")},
            }
        )
    )

    def sideload(target: str) -> subprocess.CompletedProcess[str]:
        cmd = ["pack", "install", "--config", str(config), "--from", str(usb), "--target", target]
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", *cmd], capture_output=True, text=True, timeout=120
        )

    done = sideload("tiny@0.0.2")
    assert done.returncode == 0, done.stderr
    assert "activated" in done.stderr and PackStore(fleet.device).active_version() == "0.0.2"
    tar = _served_tar(usb, "0.0.3")
    tar.write_bytes(tar.read_bytes()[:-10] + b"0123456789")  # a tampered stick
    bad = sideload("tiny@0.0.3")
    assert bad.returncode == 2 and "[hash_mismatch]" in bad.stderr
    assert PackStore(fleet.device).active_version() == "0.0.2"


@needs_root
def test_disk_full_while_staging_cleans_up_and_reports(
    fleet: Fleet, tiny_versions: dict[str, Path], tmp_path: Path
) -> None:
    """Room for the active slot and the download, not for unpacking it."""
    device = tmp_path / "small-device"
    device.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=480k", "tmpfs", str(device)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"mounting a tmpfs failed: {done.stderr!r}")
    try:
        store = PackStore(device)
        store.seed(tiny_versions["0.0.1"], "tiny@0.0.1")
        provision_trust(device / "tuf", fleet.repo.meta_dir / "1.root.json")
        events: list[UpdateEvent] = []
        with pytest.raises(UpdateRejected) as err:
            offline_updater(store, device / "tuf", fleet.url, __version__, on_event=events.append).install(
                "tiny@0.0.2"
            )
        assert err.value.reason_code == "disk_full", err.value.message
        assert [e.state for e in events if e.state != "downloading"] == ["verifying", "rejected"]
        assert not store.staging.exists() and store.active_version() == "0.0.1"
        assert store.state().last_outcome["reason_code"] == "disk_full"
        load_pack(store.active_path())  # type: ignore[arg-type]
    finally:
        subprocess.run(["umount", str(device)], check=True)


def test_memory_budget_relative_to_the_active_pack(fleet: Fleet) -> None:
    from agent.packs.health import HealthBudget

    strict = offline_updater(
        fleet.store,
        fleet.device / "tuf",
        fleet.url,
        __version__,
        on_event=fleet.events.append,
        budget=HealthBudget(memory_factor=0.0, memory_slack_mb=-1.0),
    )
    with pytest.raises(UpdateRejected, match="grew RSS") as err:
        strict.install("tiny@0.0.2")
    assert err.value.reason_code == "health_gate" and fleet.store.active_version() == "0.0.1"
    fleet.updater().install("tiny@0.0.2")  # the default budget lets the same pack through
    assert fleet.store.state().last_outcome["rss_growth_mb"] >= 0


def test_clock_before_the_trusted_root_refuses_network_updates(
    tmp_path: Path, tiny_versions: dict[str, Path]
) -> None:
    future = FleetRepository(
        tmp_path / "repo", tmp_path / "keys", clock=lambda: datetime.now(UTC) + timedelta(days=30)
    )
    future.init()  # as if this device's clock were a month behind the fleet's
    future.publish(tiny_versions["0.0.2"])
    server = make_server(future.dir, port=0)
    serve_in_thread(server)
    try:
        store = PackStore(tmp_path / "device")
        store.seed(tiny_versions["0.0.1"], "tiny@0.0.1")
        provision_trust(tmp_path / "device" / "tuf", future.meta_dir / "1.root.json")
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(UpdateRejected) as err:
            offline_updater(store, tmp_path / "device" / "tuf", url, __version__).install("tiny@0.0.2")
        assert err.value.reason_code == "clock_behind" and "set the time" in err.value.message
    finally:
        server.shutdown()


def test_swap_pauses_serving_when_both_packs_do_not_fit(
    broker: LocalBroker, fleet: Fleet, tiny_versions: dict[str, Path], start_agent: Any
) -> None:
    """A 'small board': the RAM budget holds one pack. Serving pauses for the shadow
    session; a query sent meanwhile waits and is answered, by the new pack."""
    need = verify_pack(tiny_versions["0.0.2"]).runtime.min_ram_mb
    cfg = agent_config(
        broker.url,
        tiny_versions["0.0.1"],
        state_dir=str(fleet.device),
        updates={
            "repository_url": fleet.url,
            "trusted_root": str(fleet.repo.meta_dir / "1.root.json"),
            "ram_budget_mb": int(need * 1.5),
        },
    )
    ra = start_agent(cfg, broker)
    watcher = StatusWatcher(broker, ra.cfg.topic("status"))
    watcher.wait_state("online")
    with ra.client(client="fleet") as fl:
        signed = default_operator().sign("update", ra.cfg.device_id, rollout_id="r2", target="tiny@0.0.2")
        fl.request("update", signed, 10)
        replies = [fl.request("query", {"question": "humid?", "max_tokens": 3}, 60) for _ in range(3)]
        ra.agent.updates.join(60)  # the install thread has finished
        after = fl.request("query", {"question": "humid?", "max_tokens": 3}, 60)
    assert all(r["type"] == "final" for r in replies), replies
    outcome = fleet.store.state().last_outcome
    assert outcome["state"] == "activated" and outcome["paused_serving"] == 1.0
    assert after["pack"]["version"] == "0.0.2"
    done = watcher.wait_state("online")  # the retained status said so at every step
    watcher.close()
    states = [d["state"] for d in watcher.docs]
    assert states.index("updating") < states.index("paused") < len(states) - 1, states
    assert done["pack"] == {"name": "tiny", "version": "0.0.2"}


def test_sideload_ignores_timestamp_expiry_but_nothing_else(fleet: Fleet, tmp_path: Path) -> None:
    stale = FleetRepository(
        fleet.repo.dir, fleet.repo.keys.dir, clock=lambda: datetime.now(UTC) - timedelta(days=3)
    )
    stale.refresh_timestamp()  # an old USB copy: its timestamp expired two days ago
    forged = Path(shutil.copytree(fleet.repo.dir, tmp_path / "forged"))
    _forge_targets(forged)
    with pytest.raises(UpdateRejected) as err:
        offline_updater(
            fleet.store, fleet.device / "tuf", forged.as_uri(), __version__, sideload=True
        ).install("tiny@0.0.2")
    assert err.value.reason_code == "bad_signature"
    usb = Path(shutil.copytree(fleet.repo.dir, tmp_path / "usb"))
    offline_updater(fleet.store, fleet.device / "tuf", usb.as_uri(), __version__, sideload=True).install(
        "tiny@0.0.2"
    )
    outcome = fleet.store.state().last_outcome
    assert outcome["state"] == "activated" and outcome["expiry_not_enforced"] == ["timestamp", "snapshot"]


def test_pack_that_fails_to_load_after_activation_is_rolled_back(
    broker: LocalBroker, fleet: Fleet, tiny_versions: dict[str, Path], start_agent: Any
) -> None:
    fleet.updater().install("tiny@0.0.2")
    slot = fleet.store.active_path()
    assert slot is not None
    (slot / "model.tmp").write_bytes(b"not onnx")
    (slot / "model.tmp").replace(slot / "model.onnx")  # e.g. a flash error after the switch
    ra = start_agent(_updates_config(broker, fleet, tiny_versions["0.0.1"]), broker)
    assert ra.agent.active.info() == {"name": "tiny", "version": "0.0.1"}
    outcome = fleet.store.state().last_outcome
    assert outcome["state"] == "rolled_back" and "model.onnx" in outcome["reason"]


def test_sigkill_during_the_first_health_probe_converges(
    broker: LocalBroker, fleet: Fleet, tiny_versions: dict[str, Path], tmp_path: Path, start_agent: Any
) -> None:
    fleet.updater().install("tiny@0.0.2")  # switched; first probe pending (trial)
    config = tmp_path / "agent.yaml"
    config.write_text(
        json.dumps(
            {
                "device_id": "probe-kill",
                "mqtt": {"url": broker.url},
                "state_dir": str(fleet.device),
                "pack": {"threads": 1},
                "prompt": {"system": "Be brief."},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)], stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while PackStore(fleet.device).state().trial_boots < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()  # the boot was counted; the probe had not passed
    proc.wait(10)
    store = PackStore(fleet.device)
    store.converge()
    assert store.state().trial, "the kill should land before the probe passed"
    assert store.active_version() == "0.0.2"
    verify_pack(store.active_path())  # type: ignore[arg-type]
    ra = start_agent(_updates_config(broker, fleet, tiny_versions["0.0.1"]), broker)
    st = PackStore(fleet.device).state()
    assert ra.agent.active.info() == {"name": "tiny", "version": "0.0.2"} and not st.trial


@pytest.mark.parametrize("good", [True, False])
def test_pack_probe_runs_the_first_health_probe_like_a_start(
    tiny_versions: dict[str, Path], tmp_path: Path, good: bool
) -> None:
    """`edge-agent pack probe` (what make test-arm64 runs after a sideload): a trial pack that
    reproduces its goldens is confirmed (exit 0), one that does not is rolled back (exit 1)."""
    state = tmp_path / "state"
    store = PackStore(state)
    store.seed(tiny_versions["0.0.1"], "tiny@0.0.1")
    pack = Path(shutil.copytree(tiny_versions["0.0.3"], tmp_path / "next"))
    if not good:
        manifest = json.loads((pack / "manifest.json").read_text())
        manifest["golden"][0]["token_ids"] = [(t + 1) % 50 for t in manifest["golden"][0]["token_ids"]]
        (pack / "manifest.json").write_text(json.dumps(manifest))
    staging = store.fresh_staging()
    for p in pack.iterdir():
        shutil.copy2(p, staging / p.name)
    store.activate_staged("tiny@0.0.3")  # as if a sideload had just switched
    config = tmp_path / "agent.yaml"
    config.write_text(f"device_id: probe-dev\nstate_dir: {state}\npack: {{threads: 1}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "pack", "probe", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    after = PackStore(state).state()
    if good:
        assert done.returncode == 0 and done.stdout.startswith("confirmed: tiny 0.0.3"), done.stderr
        assert not after.trial and after.versions[after.active or ""] == "tiny@0.0.3"
    else:
        assert done.returncode == 1 and "rolled back to tiny 0.0.1" in done.stderr, done.stderr
        assert after.versions[after.active or ""] == "tiny@0.0.1"
