"""Install a signed pack: metadata -> decide -> download -> verify -> stage -> gate -> switch.

The shape follows python-tuf's ngclient: :mod:`metadata` verifies (ngclient), :mod:`decide`
rules without IO, :mod:`fetch` only moves bytes (an injectable :class:`PackFetcher`),
:mod:`stage` unpacks, the gate (:data:`Gate`) judges the staged pack, and the store makes
the one atomic switch. Every step reports an event (``downloading`` with percent,
``verifying``, ``staged``, ``activated``, ``rejected``); every failure is an
:class:`UpdateRejected` with a reason code and leaves the active pack untouched.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile

from agent.packs import metadata
from agent.packs.decide import Plan, Variant, choose_variant, decide, parse_target
from agent.packs.fetch import IncompleteDownload, PackFetcher, UrlFetcher, download
from agent.packs.health import HealthBudget, offline_gate
from agent.packs.stage import unpack
from agent.packs.store import PackStore
from agent.packs.verify import UpdateRejected, check_runtime
from model_packs import hardware as hw
from model_packs import runtimes

if TYPE_CHECKING:
    from agent.inference import Engine

log = structlog.get_logger("edge_agent.update")


@dataclass(frozen=True)
class UpdateEvent:
    state: str
    target: str
    percent: float | None = None
    reason_code: str | None = None
    reason: str | None = None


Hook = Callable[[str], None]
# ``gate(staged_dir, need_mb)`` judges the staged pack; returns its figures or raises
# UpdateRejected. The serving agent's gate is ActivePack.gate; the CLI's is health.offline_gate.
Gate = Callable[[Path, int], dict[str, float]]


class PackUpdater:
    def __init__(
        self,
        store: PackStore,
        tuf_dir: Path,
        repository_url: str,
        agent_version: str,
        gate: Gate,
        *,
        hardware: str = "any",
        ram_mb: int | None = None,
        variants: bool = True,
        on_event: Callable[[UpdateEvent], None] | None = None,
        hook: Hook | None = None,
        fetcher: PackFetcher | None = None,
        sideload: bool = False,
    ) -> None:
        self.store, self.tuf_dir = store, tuf_dir
        self.base = repository_url.rstrip("/")
        self.agent_version = agent_version
        # this CPU's tags and this board's RAM: which variant of a release fits
        self.profile = hw.detect(hardware, ram_mb=ram_mb)
        self.variants = variants  # False: always the release's base target
        self.gate = gate
        self.sideload = sideload  # explicit: never inferred from the URL
        self.fetcher = fetcher or UrlFetcher()
        self.on_event = on_event or (lambda e: None)
        self.hook = hook or (lambda stage: None)  # fault injection in tests: called at each stage
        self.onnxruntime = runtimes.installed_onnxruntime()  # the version this device runs packs on

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

    def check(self, target: str) -> tuple[Plan, TargetFile]:
        """Verify the metadata and decide, without downloading anything."""
        name, version, path = parse_target(target)
        chosen: list[Variant] = []

        def variant_for_this_cpu(base: TargetFile) -> str | None:
            custom = base.unrecognized_fields.get("custom")
            found = choose_variant(custom, name, version, self.profile.tags, self.profile.ram_mb)
            if found is None or not self.variants:
                return None
            chosen.append(found)
            log.info("pack_variant", target=target, variant=found.name, hardware=found.tag, why=found.why)
            return found.path

        info = metadata.refresh_target(
            self.tuf_dir, self.base, path, self.fetcher, self.sideload, variant_for_this_cpu
        )
        custom = info.unrecognized_fields.get("custom")
        variant = chosen[0] if chosen else None
        plan = decide(
            target, custom, self.store.active_version(), self.agent_version, self.profile.tags, variant
        )
        if variant is None:
            log.info("pack_variant", target=target, variant="base", hardware=sorted(self.profile.tags))
        return plan, info

    def _install(self, target: str) -> Path:
        plan, info = self.check(target)
        self.hook("download")
        part = self._download(info, target, plan)
        self.hook("verify")
        self._verify(info, part, target)
        self.hook("stage")
        staging = self.store.fresh_staging()
        try:
            manifest = unpack(part, staging, plan.name, plan.version)
            if plan.variant is not None and manifest.variant != plan.variant:
                raise UpdateRejected(
                    "bad_pack", f"pack is variant {manifest.variant}, signed as {plan.variant}"
                )
            self.on_event(UpdateEvent("staged", target))
            check_runtime(manifest, self.onnxruntime, runtimes.machine())
        except UpdateRejected:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.hook("health")
        stats = self.gate(staging, manifest.runtime.min_ram_mb)
        self.hook("switch")
        slot = self.store.activate_staged(target)
        part.unlink(missing_ok=True)
        extra = {"expiry_not_enforced": ["timestamp", "snapshot"]} if self.sideload else {}
        variant = {"variant": manifest.variant}
        self.store.record({"state": "activated", "target": target, **variant, **stats, **extra})
        self.on_event(UpdateEvent("activated", target))
        log.info("update_activated", target=target, slot=slot, **variant, **stats)
        return self.store.slot_path(slot)

    def _download(self, info: TargetFile, target: str, plan: Plan) -> Path:
        self.store.ensure_dirs()
        variant = f"-{plan.variant}" if plan.variant else ""
        part = self.store.downloads / f"{plan.name}-{plan.version}{variant}.tar.part"
        last = [-10.0]

        def progress(done: int, total: int) -> None:
            pct = round(100 * done / total, 1)
            if pct >= last[0] + 10 or done == total:
                last[0] = pct
                self.on_event(UpdateEvent("downloading", target, percent=pct))

        url = metadata.target_url(self.base, self.tuf_dir, info)
        try:
            download(self.fetcher, url, part, info.length, progress)
        except IncompleteDownload as exc:
            raise UpdateRejected("download_interrupted", str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                part.unlink(missing_ok=True)
                raise UpdateRejected("disk_full", f"no space left for {info.length} bytes: {exc}") from None
            raise UpdateRejected("unreachable", f"download failed: {exc}") from None
        except tuf_errors.DownloadError as exc:
            raise UpdateRejected("unreachable", f"download failed: {exc}") from None
        return part

    def _verify(self, info: TargetFile, part: Path, target: str) -> None:
        self.on_event(UpdateEvent("verifying", target))
        try:
            with part.open("rb") as fh:
                info.verify_length_and_hashes(fh)
        except tuf_errors.LengthOrHashMismatchError as exc:
            part.unlink(missing_ok=True)  # a bad file is never resumed
            raise UpdateRejected(
                "hash_mismatch", f"downloaded pack does not match its signed hashes: {exc}"
            ) from None


def provision_trust(tuf_dir: Path, trusted_root: Path) -> None:
    """Install the fleet's root metadata once; later roots arrive signed through TUF."""
    tuf_dir.mkdir(parents=True, exist_ok=True)
    if not (tuf_dir / "root.json").exists():
        shutil.copyfile(trusted_root, tuf_dir / "root.json")


def offline_updater(
    store: PackStore,
    tuf_dir: Path,
    repository_url: str,
    agent_version: str,
    *,
    budget: HealthBudget | None = None,
    threads: int = 2,
    **options: Any,
) -> PackUpdater:
    """An updater where no agent serves (sideload CLI, benchmarks, tests): the health gate
    loads the active pack for its baseline, then the staged one, each in its own engine."""

    def open_engine(path: Path, hash_files: bool) -> Engine:
        from agent.inference import Engine, load_pack  # onnxruntime: only once a pack is judged

        return Engine(load_pack(path, hash_files=hash_files), threads=threads)

    gate = offline_gate(open_engine, store.active_path(), budget or HealthBudget())
    return PackUpdater(store, tuf_dir, repository_url, agent_version, gate, **options)
