"""Install a signed pack: metadata -> download -> verify -> stage -> health gate -> switch.

Every step reports an event (``downloading`` with percent, ``verifying``, ``staged``,
``activated``, ``rejected``); every failure is an :class:`UpdateRejected` with a reason
code, and leaves the active pack untouched. TUF metadata is python-tuf's ngclient: the
trusted root was installed at provisioning and only signed metadata moves it forward.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import Updater

from agent.packs.fetch import IncompleteDownload, UrlFetcher, download
from agent.packs.store import PackStore
from agent.packs.verify import (
    UpdateRejected,
    check_custom,
    check_members,
    check_version_goes_up,
    golden_agreement,
    parse_target,
)
from model_packs.errors import PackError
from model_packs.format import Manifest, verify_pack

log = structlog.get_logger("edge_agent.update")
CREATED_FIELD = "x-edge-created"  # written by fleet.repository into the signed root
MAX_PACK_BYTES = 4 << 30


@dataclass(frozen=True)
class UpdateEvent:
    state: str
    target: str
    percent: float | None = None
    reason_code: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class HealthBudget:
    latency_factor: float = 3.0  # new pack's ms/token may be at most this x the active one's ...
    latency_slack_ms: float = 5.0  # ... plus this (tiny packs' timings are mostly noise)
    memory_factor: float = 2.0  # the shadow session's RSS growth vs the active pack's ...
    memory_slack_mb: float = 64.0  # ... plus this
    golden_tokens: int = 16


Hook = Callable[[str], None]
# ``room(need_mb)`` makes memory for the shadow session; it yields True when it had to
# pause serving (unload the active pack) because both packs do not fit side by side.
Room = Callable[[int], AbstractContextManager[bool]]


@contextmanager
def _always_room(need_mb: int) -> Iterator[bool]:
    yield False


class PackUpdater:
    def __init__(
        self,
        store: PackStore,
        tuf_dir: Path,
        repository_url: str,
        agent_version: str,
        hardware: str = "any",
        on_event: Callable[[UpdateEvent], None] | None = None,
        budget: HealthBudget | None = None,
        hook: Hook | None = None,
        room: Room | None = None,
    ) -> None:
        self.room = room or _always_room
        self.sideload = repository_url.startswith("file:")
        self.store, self.tuf_dir = store, tuf_dir
        self.base = repository_url.rstrip("/")
        self.agent_version, self.hardware = agent_version, hardware
        self.on_event = on_event or (lambda e: None)
        self.budget = budget or HealthBudget()
        self.hook = hook or (lambda stage: None)  # fault injection in tests: called at each stage

    # ------------------------------------------------------------ steps

    def _check_clock(self) -> None:
        """A clock before the trusted root was made would take expired metadata for fresh:
        network updates wait for a sane clock (a sideload is the operator's own copy)."""
        if self.sideload:
            return
        created = json.loads((self.tuf_dir / "root.json").read_text())["signed"].get(CREATED_FIELD)
        if created and datetime.now(UTC) < datetime.fromisoformat(created):
            raise UpdateRejected(
                "clock_behind",
                f"the device clock ({datetime.now(UTC):%Y-%m-%d %H:%M}Z) is earlier than the "
                f"trusted root ({created}); set the time (NTP, RTC) before updating over the network",
            )

    def _metadata(self, path: str) -> Any:
        if not (self.tuf_dir / "root.json").exists():
            raise UpdateRejected("no_trust", f"no trusted root in {self.tuf_dir}: provision the device first")
        self._check_clock()
        updater = Updater(
            metadata_dir=str(self.tuf_dir),
            metadata_base_url=f"{self.base}/metadata/",
            target_base_url=f"{self.base}/targets/",
            fetcher=UrlFetcher(),
            bootstrap=None,  # the trusted root.json already in metadata_dir
        )
        if self.sideload:
            _ignore_timestamp_and_snapshot_expiry(updater)
        try:
            updater.refresh()
            info = updater.get_targetinfo(path)
        except tuf_errors.ExpiredMetadataError as exc:
            raise UpdateRejected("expired_metadata", str(exc)) from None
        except (tuf_errors.BadVersionNumberError, tuf_errors.EqualVersionNumberError) as exc:
            raise UpdateRejected("replayed_metadata", str(exc)) from None
        except tuf_errors.UnsignedMetadataError as exc:
            raise UpdateRejected("bad_signature", str(exc)) from None
        except tuf_errors.RepositoryError as exc:
            raise UpdateRejected("bad_metadata", f"{type(exc).__name__}: {exc}") from None
        except (tuf_errors.DownloadError, OSError) as exc:
            raise UpdateRejected("unreachable", f"repository {self.base}: {exc}") from None
        if info is None:
            raise UpdateRejected("unknown_target", f"{path} is not a signed target of the repository")
        return info

    def _download(self, info: Any, target: str, name: str, version: str) -> Path:
        part = self.store.downloads / f"{name}-{version}.tar.part"

        def progress(done: int, total: int) -> None:
            pct = round(100 * done / total, 1)
            if pct >= getattr(progress, "last", -10.0) + 10 or done == total:
                progress.last = pct  # type: ignore[attr-defined]
                self.on_event(UpdateEvent("downloading", target, percent=pct))

        try:
            download(f"{self.base}/targets/{info.path}", part, info.length, progress)
        except IncompleteDownload as exc:
            raise UpdateRejected("download_interrupted", str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                part.unlink(missing_ok=True)
                raise UpdateRejected("disk_full", f"no space left for {info.length} bytes: {exc}") from None
            raise UpdateRejected("unreachable", f"download failed: {exc}") from None
        return part

    def _verify(self, info: Any, part: Path, target: str) -> None:
        self.on_event(UpdateEvent("verifying", target))
        try:
            with part.open("rb") as fh:
                info.verify_length_and_hashes(fh)
        except tuf_errors.LengthOrHashMismatchError as exc:
            part.unlink(missing_ok=True)  # a bad file is never resumed
            raise UpdateRejected(
                "hash_mismatch", f"downloaded pack does not match its signed hashes: {exc}"
            ) from None

    def _stage(self, part: Path, name: str, version: str) -> Manifest:
        staging = self.store.fresh_staging()
        try:
            with tarfile.open(part, "r:") as tar:
                for member in check_members(tar.getmembers(), MAX_PACK_BYTES):
                    tar.extract(member, staging, filter="data")
            manifest = verify_pack(staging)
        except PackError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise UpdateRejected("bad_pack", exc.message) from None
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            code = "disk_full" if exc.errno == errno.ENOSPC else "bad_pack"
            raise UpdateRejected(code, f"unpacking failed: {exc}") from None
        except tarfile.TarError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise UpdateRejected("bad_pack", f"pack is not a valid tar: {exc}") from None
        if (manifest.name, manifest.version) != (name, version):
            shutil.rmtree(staging, ignore_errors=True)
            raise UpdateRejected("bad_pack", f"pack manifest says {manifest.name}@{manifest.version}")
        return manifest

    def health_gate(self, pack_dir: Path) -> dict[str, float]:
        """Load the pack in a shadow engine; golden prompts must agree, latency within budget."""
        from agent.inference import Engine, GenerationRequest, load_pack

        rss_before = _rss_mb()
        try:
            # staging was hashed in _stage, the active slot at boot: no third pass over the files
            engine = Engine(load_pack(pack_dir, hash_files=False), threads=2)
        except Exception as exc:
            raise UpdateRejected("health_gate", f"pack does not load: {exc}") from None
        worst, ms_per_token = 1.0, []
        for g in engine.pack.manifest.golden:
            n = min(len(g.token_ids), self.budget.golden_tokens)
            done = engine.generate(GenerationRequest(engine.prompt_ids(g.prompt), n))
            score = golden_agreement(done.token_ids, g.token_ids[:n])
            worst = min(worst, score)
            if score < g.min_match:
                raise UpdateRejected(
                    "health_gate",
                    f"golden prompt {g.prompt!r}: {score:.2f} of the recorded "
                    f"tokens reproduced, {g.min_match} needed",
                )
            ms_per_token.append(done.usage.total_s * 1000 / max(1, len(done.token_ids)))
        return {
            "golden_min_agreement": worst,
            "ms_per_token": sum(ms_per_token) / max(1, len(ms_per_token)),
            "rss_growth_mb": max(0.0, _rss_mb() - rss_before),
        }

    def _check_budget(self, new: dict[str, float]) -> None:
        active = self.store.active_path()
        if active is None or not self.store.state().active:
            return
        try:
            old = self.health_gate(active)
        except UpdateRejected:
            return  # the active pack itself misbehaves: do not hold the new one to it
        mem_limit = self.budget.memory_factor * old["rss_growth_mb"] + self.budget.memory_slack_mb
        if new["rss_growth_mb"] > mem_limit:
            raise UpdateRejected(
                "health_gate",
                f"loading the pack grew RSS by {new['rss_growth_mb']:.0f} MB, over the budget of "
                f"{mem_limit:.0f} MB ({self.budget.memory_factor}x the active pack's "
                f"+ {self.budget.memory_slack_mb:g})",
            )
        limit = self.budget.latency_factor * old["ms_per_token"] + self.budget.latency_slack_ms
        if new["ms_per_token"] > limit:
            raise UpdateRejected(
                "health_gate",
                f"{new['ms_per_token']:.1f} ms/token is over "
                f"{self.budget.latency_factor}x the active pack's {old['ms_per_token']:.1f}",
            )

    # ------------------------------------------------------------ the whole install

    def install(self, target: str) -> Path:
        """Install ``NAME@VERSION``; returns the new active slot. Raises UpdateRejected."""
        try:
            return self._install(target)
        except UpdateRejected as exc:
            self.store.record(
                {"state": "rejected", "target": target, "reason_code": exc.reason_code, "reason": exc.message}
            )
            self.on_event(UpdateEvent("rejected", target, reason_code=exc.reason_code, reason=exc.message))
            log.warning("update_rejected", target=target, reason_code=exc.reason_code, reason=exc.message)
            raise

    def _install(self, target: str) -> Path:
        name, version, path = parse_target(target)
        info = self._metadata(path)
        custom = info.unrecognized_fields.get("custom") or {}
        check_custom(custom, name, version, self.agent_version, self.hardware)
        if custom.get("rollback") is not True:
            check_version_goes_up(self.store.active_version(), version)
        self.hook("download")
        part = self._download(info, target, name, version)
        self.hook("verify")
        self._verify(info, part, target)
        self.hook("stage")
        self._stage(part, name, version)
        self.on_event(UpdateEvent("staged", target))
        self.hook("health")
        need_mb = verify_pack(self.store.staging).runtime.min_ram_mb
        with self.room(need_mb) as paused:
            stats = self.health_gate(self.store.staging)
            self._check_budget(stats)
        stats["paused_serving"] = float(paused)
        self.hook("switch")
        slot = self.store.activate_staged(target)
        part.unlink(missing_ok=True)
        extra = {"expiry_not_enforced": ["timestamp", "snapshot"]} if self.sideload else {}
        self.store.record({"state": "activated", "target": target, **stats, **extra})
        self.on_event(UpdateEvent("activated", target))
        log.info("update_activated", target=target, slot=slot, **stats)
        return self.store.slot_path(slot)


def provision_trust(tuf_dir: Path, trusted_root: Path) -> None:
    """Install the fleet's root metadata once; later roots arrive signed through TUF."""
    tuf_dir.mkdir(parents=True, exist_ok=True)
    if not (tuf_dir / "root.json").exists():
        shutil.copyfile(trusted_root, tuf_dir / "root.json")


def _rss_mb() -> float:
    """Resident set size from /proc/self/statm (0 where there is no /proc)."""
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20


def _ignore_timestamp_and_snapshot_expiry(updater: Updater) -> None:
    """A sideload (USB stick) is never fresh: keep every signature, hash, version and root
    check, but do not enforce timestamp and snapshot expiry (python-tuf#2359). ngclient
    has no option for it, so the two final checks of its trusted set are replaced by the
    same checks minus expiry; tuf is pinned below 8 for this."""
    trusted = updater._trusted_set

    def final_snapshot() -> None:
        expected = trusted.timestamp.snapshot_meta.version
        if trusted.snapshot.version != expected:
            raise tuf_errors.BadVersionNumberError(
                f"Expected snapshot version {expected}, got {trusted.snapshot.version}"
            )

    trusted._check_final_timestamp = lambda: None  # type: ignore[method-assign]
    trusted._check_final_snapshot = final_snapshot  # type: ignore[method-assign]
    log.warning("sideload_expiry_not_enforced", roles=["timestamp", "snapshot"])
