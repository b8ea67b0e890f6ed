"""The update decision rules, against an in-memory signed repository (milliseconds each):
which targets a device accepts, and which reason code it gives for the others."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import __version__
from agent.packs.decide import Plan, decide
from agent.packs.store import PackStore
from agent.packs.updater import offline_updater, provision_trust
from agent.packs.verify import UpdateRejected
from fleet.repository import FleetRepository
from tests.repo_sim import BASE, MemoryRepository


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, tiny_versions: dict[str, Path]) -> FleetRepository:
    """0.0.2 for any board; 0.0.3 only for pi5 and agents >= 99; 0.0.1 re-signed as a rollback."""
    d = tmp_path_factory.mktemp("signed")
    repo = FleetRepository(d / "repo", d / "keys")
    repo.init()
    repo.publish(tiny_versions["0.0.2"])
    repo.publish(tiny_versions["0.0.3"], min_agent_version="99.0.0", hardware=("pi5",))
    repo.publish(tiny_versions["0.0.1"], rollback=True)
    return repo


def _check(tmp_path: Path, repo: FleetRepository, seed: Path, target: str, hardware: str = "any") -> Plan:
    store = PackStore(tmp_path / "dev")
    if store.active_path() is None:
        store.seed(seed, f"tiny@{seed.name.rsplit('-', 1)[1]}")
        provision_trust(tmp_path / "dev" / "tuf", repo.meta_dir / "1.root.json")
    fetcher = MemoryRepository.snapshot_of(repo.dir)
    up = offline_updater(
        store, tmp_path / "dev" / "tuf", BASE, __version__, hardware=hardware, fetcher=fetcher
    )
    return up.check(target)[0]


def _reason(tmp_path: Path, repo: FleetRepository, seed: Path, target: str, hardware: str = "any") -> str:
    with pytest.raises(UpdateRejected) as err:
        _check(tmp_path, repo, seed, target, hardware)
    return err.value.reason_code


def test_a_newer_pack_for_any_board_is_accepted(
    tmp_path: Path, signed: FleetRepository, tiny_versions: dict[str, Path]
) -> None:
    assert _check(tmp_path, signed, tiny_versions["0.0.1"], "tiny@0.0.2") == Plan(
        "tiny", "0.0.2", "packs/tiny/0.0.2.tar", rollback=False
    )


@pytest.mark.parametrize(
    ("seed", "target", "hardware", "reason"),
    [
        ("0.0.3", "tiny@0.0.2", "any", "downgrade"),
        ("0.0.2", "tiny@0.0.2", "any", "downgrade"),  # the same version is not an update
        ("0.0.1", "tiny@0.0.3", "pi5", "incompatible"),  # needs agent >= 99
        ("0.0.1", "tiny@9.9.9", "any", "unknown_target"),
        ("0.0.1", "Tiny@0.0.2", "any", "bad_target"),
        ("0.0.1", "tiny@0.0", "any", "bad_target"),
        ("0.0.1", "tiny", "any", "bad_target"),
    ],
)
def test_refusals_and_their_reason_codes(
    tmp_path: Path,
    signed: FleetRepository,
    tiny_versions: dict[str, Path],
    seed: str,
    target: str,
    hardware: str,
    reason: str,
) -> None:
    assert _reason(tmp_path, signed, tiny_versions[seed], target, hardware) == reason


def test_a_lower_version_signed_as_rollback_is_accepted(
    tmp_path: Path, signed: FleetRepository, tiny_versions: dict[str, Path]
) -> None:
    plan = _check(tmp_path, signed, tiny_versions["0.0.2"], "tiny@0.0.1")
    assert plan.rollback and plan.version == "0.0.1"


@pytest.mark.parametrize(
    ("custom", "reason"),
    [
        (None, "bad_target"),
        ({"name": "other", "version": "1.0.0"}, "bad_target"),
        ({"name": "tiny", "version": "1.0.0", "hardware": ["pi4"]}, "incompatible"),
        ({"name": "tiny", "version": "1.0.0", "min_agent_version": "1000.0.0"}, "incompatible"),
    ],
)
def test_decide_on_signed_custom_metadata(custom: dict[str, object] | None, reason: str) -> None:
    with pytest.raises(UpdateRejected) as err:
        decide("tiny@1.0.0", custom, "0.9.0", __version__, frozenset({"pi5", "x86_64"}))
    assert err.value.reason_code == reason


def test_decide_orders_by_semver_precedence() -> None:
    custom = {"name": "tiny", "version": "1.10.0"}
    # not a string sort
    assert decide("tiny@1.10.0", custom, "1.9.0", __version__, frozenset()).version == "1.10.0"
    pre = {"name": "tiny", "version": "1.0.0-rc.1"}
    with pytest.raises(UpdateRejected, match="not above"):
        # a pre-release is below its release
        decide("tiny@1.0.0-rc.1", pre, "1.0.0", __version__, frozenset())


def test_replayed_metadata_is_refused(
    tmp_path: Path, signed: FleetRepository, tiny_versions: dict[str, Path]
) -> None:
    old = MemoryRepository.snapshot_of(signed.dir)
    signed.refresh_timestamp()
    _check(tmp_path, signed, tiny_versions["0.0.1"], "tiny@0.0.2")  # the device saw the newer timestamp
    store = PackStore(tmp_path / "dev")
    up = offline_updater(store, tmp_path / "dev" / "tuf", BASE, __version__, fetcher=old)
    with pytest.raises(UpdateRejected) as err:
        up.check("tiny@0.0.2")
    assert err.value.reason_code == "replayed_metadata"


def test_expired_timestamp_is_refused_over_the_network_but_not_on_a_sideload(
    tmp_path: Path, tiny_versions: dict[str, Path]
) -> None:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(tiny_versions["0.0.2"])
    FleetRepository(
        repo.dir, repo.keys.dir, clock=lambda: datetime.now(UTC) - timedelta(days=3)
    ).refresh_timestamp()
    assert _reason(tmp_path, repo, tiny_versions["0.0.1"], "tiny@0.0.2") == "expired_metadata"
    store = PackStore(tmp_path / "dev")
    fetcher = MemoryRepository.snapshot_of(repo.dir)
    up = offline_updater(store, tmp_path / "dev" / "tuf", BASE, __version__, fetcher=fetcher, sideload=True)
    assert up.check("tiny@0.0.2")[0].version == "0.0.2"


@pytest.mark.parametrize("consistent", [True, False])
def test_target_file_name_follows_the_trusted_root(
    tmp_path: Path, tiny_versions: dict[str, Path], consistent: bool
) -> None:
    """HASH.NAME under consistent snapshots (TUF 5.7.3), the plain name otherwise; both install."""
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init(consistent_snapshot=consistent)
    repo.publish(tiny_versions["0.0.2"])
    store = PackStore(tmp_path / "dev")
    store.seed(tiny_versions["0.0.1"], "tiny@0.0.1")
    provision_trust(tmp_path / "dev" / "tuf", repo.meta_dir / "1.root.json")
    fetcher = MemoryRepository.snapshot_of(repo.dir)
    offline_updater(store, tmp_path / "dev" / "tuf", BASE, __version__, fetcher=fetcher).install("tiny@0.0.2")
    assert store.active_version() == "0.0.2"
    (target,) = [u for u in fetcher.requests if "/targets/" in u]
    name = target.rsplit("/", 1)[1]
    assert bool(re.fullmatch(r"[0-9a-f]{64}\.0\.0\.2\.tar", name)) is consistent, name
    versioned = [u for u in fetcher.requests if re.search(r"/metadata/\d+\.snapshot\.json$", u)]
    assert bool(versioned) is consistent, fetcher.requests
