"""UpdateService and ActivePack on their own: an in-memory signed repository, real packs,
real onnxruntime sessions; no Agent and no broker. Counts engine constructions, watches
the served state, and checks that replaced engines are released."""

from __future__ import annotations

import gc
import json
import re
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent.config import UpdatesConfig
from agent.inference import Engine, load_pack
from agent.packs.active import ActivePack
from agent.packs.health import rss_mb
from agent.packs.service import UpdateService
from agent.packs.store import PackStore
from agent.packs.updater import provision_trust
from fleet.repository import FleetRepository
from tests.repo_sim import BASE, MemoryRepository


class Device:
    """A seeded store, an ActivePack whose factory counts loads, and an UpdateService."""

    def __init__(
        self, root: Path, repo: FleetRepository, seed: Path, ram_budget_mb: int | None = None
    ) -> None:
        self.loads: Counter[str] = Counter()
        self.engines: list[weakref.ref[Engine]] = []
        self.states: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.store = PackStore(root)
        self.active = ActivePack(
            self.store,
            self._open,
            str(seed),
            ram_budget_mb,
            on_change=lambda: self.states.append(self.active.state),
        )
        self.store.converge()
        self.active.boot()
        provision_trust(root / "tuf", repo.meta_dir / "1.root.json")
        self.fetcher = MemoryRepository.snapshot_of(repo.dir)
        self.service = UpdateService(
            self.active,
            lambda: UpdatesConfig(repository_url=BASE),
            root / "tuf",
            self.events.append,
            self.fetcher,
        )

    def _open(self, path: Path, hash_files: bool) -> Engine:
        engine = Engine(load_pack(path, hash_files=hash_files, check_ram=False), threads=1)
        self.loads[engine.pack.manifest.version] += 1
        self.engines.append(weakref.ref(engine))
        return engine

    def update(self, target: str) -> list[str]:
        assert self.service.handle({"v": 1, "id": "u", "rollout_id": "r", "target": target}) == "started"
        self.service.join(60)
        return [e["state"] for e in self.events if e["state"] != "downloading"]


@pytest.fixture()
def repo(tmp_path: Path, tiny_versions: dict[str, Path]) -> FleetRepository:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(tiny_versions["0.0.2"])
    return repo


def test_update_loads_the_new_pack_once_and_adopts_the_gate_engine(
    tmp_path: Path, repo: FleetRepository, tiny_versions: dict[str, Path]
) -> None:
    dev = Device(tmp_path / "dev", repo, tiny_versions["0.0.1"])
    assert dev.update("tiny@0.0.2") == ["verifying", "staged", "activated"]
    assert dev.loads == {"0.0.1": 1, "0.0.2": 1}  # the shadow engine became the serving one
    assert dev.active.info() == {"name": "tiny", "version": "0.0.2"} and not dev.store.state().trial
    assert dev.states == ["online", "updating", "updating", "online"]  # boot, start, new pack adopted, done
    hashed = re.compile(r"/targets/packs/tiny/[0-9a-f]{64}\.0\.0\.2\.tar$")  # consistent snapshot
    assert [u for u in dev.fetcher.requests if "/targets/" in u and hashed.search(u)], dev.fetcher.requests


def test_ram_tight_swap_pauses_and_still_loads_each_pack_once(
    tmp_path: Path, repo: FleetRepository, tiny_versions: dict[str, Path]
) -> None:
    need = load_pack(tiny_versions["0.0.2"]).manifest.runtime.min_ram_mb
    dev = Device(tmp_path / "dev", repo, tiny_versions["0.0.1"], ram_budget_mb=int(need * 1.5))
    assert dev.update("tiny@0.0.2") == ["verifying", "staged", "activated"]
    assert dev.loads == {"0.0.1": 1, "0.0.2": 1}  # the old pack was not loaded again
    assert "paused" in dev.states and dev.states[-1] == "online"
    assert dev.states.index("updating") < dev.states.index("paused")
    assert dev.store.state().last_outcome["paused_serving"] == 1.0


def test_failed_gate_on_a_ram_tight_board_reloads_the_old_pack_and_resumes(
    tmp_path: Path, repo: FleetRepository, tiny_versions: dict[str, Path]
) -> None:
    bad = tmp_path / "bad-pack"
    bad.mkdir()
    for p in tiny_versions["0.0.3"].iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["golden"][0]["token_ids"] = [(t + 1) % 50 for t in manifest["golden"][0]["token_ids"]]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    repo.publish(bad)
    need = manifest["runtime"]["min_ram_mb"]
    dev = Device(tmp_path / "dev", repo, tiny_versions["0.0.1"], ram_budget_mb=int(need * 1.5))
    assert dev.update("tiny@0.0.3") == ["verifying", "staged", "rejected"]
    assert dev.events[-1]["reason_code"] == "health_gate"
    assert dev.loads == {"0.0.1": 2, "0.0.3": 1}  # unloaded for room, so loaded once more
    assert dev.active.info() == {"name": "tiny", "version": "0.0.1"} and dev.states[-1] == "online"


def test_busy_while_an_install_runs(
    tmp_path: Path, repo: FleetRepository, tiny_versions: dict[str, Path]
) -> None:
    dev = Device(tmp_path / "dev", repo, tiny_versions["0.0.1"])
    with dev.active.updating():  # holds the swap: the install thread waits behind it
        assert dev.service.handle({"v": 1, "id": "a", "rollout_id": "r", "target": "tiny@0.0.2"}) == "started"
        assert dev.service.handle({"v": 1, "id": "b", "rollout_id": "r", "target": "tiny@0.0.2"}) == "busy"
    dev.service.join(60)
    assert [e["reason_code"] for e in dev.events if e["state"] == "rejected"] == ["busy"]
    assert dev.active.info() == {"name": "tiny", "version": "0.0.2"}


def test_repeated_reloads_release_every_old_engine_and_keep_rss_flat(
    tmp_path: Path, repo: FleetRepository, tiny_versions: dict[str, Path]
) -> None:
    dev = Device(tmp_path / "dev", repo, tiny_versions["0.0.1"])
    dev.active.reload()
    after_one = rss_mb()
    for _ in range(10):
        dev.active.reload()
    gc.collect()
    assert dev.loads == {"0.0.1": 12}
    assert sum(ref() is not None for ref in dev.engines) == 1  # only the serving engine is alive
    assert rss_mb() <= after_one * 1.10, (after_one, rss_mb())


def test_a_pack_that_loads_but_fails_to_run_is_refused_not_raised(tiny_versions: dict[str, Path]) -> None:
    """onnxruntime 1.22 on aarch64 starts the session, then fails at the first run: that is
    a refusal with a reason (and a `rejected` event), never a traceback out of the install."""
    from agent.packs.health import HealthBudget, offline_gate
    from agent.packs.verify import UpdateRejected

    def failing_kernel(path: Path, hash_files: bool) -> Engine:
        engine = Engine(load_pack(path, hash_files=hash_files, check_ram=False), threads=1)

        def run(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("Only 4b quantization is supported for unpacked compute")

        engine.logits_for = run  # type: ignore[method-assign]  # the injected fault: the runtime's kernel
        return engine

    gate = offline_gate(failing_kernel, None, HealthBudget())
    with pytest.raises(UpdateRejected, match="pack does not run: Only 4b") as err:
        gate(tiny_versions["0.0.2"], 0)
    assert err.value.reason_code == "health_gate"


def test_a_pack_above_this_devices_onnxruntime_is_refused_before_it_loads(
    tmp_path: Path, tiny_versions: dict[str, Path]
) -> None:
    """The manifest's floor for this machine is checked on the staged pack, before the gate
    loads it: `runtime_mismatch`, the pack never reaches onnxruntime, the old one serves."""
    import shutil

    from model_packs import runtimes

    pack = tmp_path / "needs-a-newer-runtime"
    shutil.copytree(tiny_versions["0.0.3"], pack)
    manifest = json.loads((pack / "manifest.json").read_text())
    manifest["runtime"]["onnxruntime_by_machine"] = {runtimes.machine(): ">=99.0.0"}
    (pack / "manifest.json").write_text(json.dumps(manifest))
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(pack)
    dev = Device(tmp_path / "device", repo, tiny_versions["0.0.1"])
    assert dev.update("tiny@0.0.3") == ["verifying", "staged", "rejected"]
    rejected = dev.events[-1]
    assert rejected["reason_code"] == "runtime_mismatch"
    assert f"needs onnxruntime >= 99.0.0 on {runtimes.machine()}" in rejected["reason"]
    assert "0.0.3" not in dev.loads
    assert dev.active.state == "online" and dev.store.active_version() == "0.0.1"
