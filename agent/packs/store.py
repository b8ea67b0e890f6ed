"""A/B pack slots and the state file that says which one is active.

Layout under the state directory::

    packs/a/  packs/b/      two slots: the active pack and the previous one
    packs/staging/          a pack being unpacked and checked (never served)
    packs/downloads/        resumable ``.part`` downloads
    packs/state.json        {"active", "previous", versions, trial, last outcome}

The switch is one atomic write of ``state.json`` (temp file, fsync, rename, fsync of the
directory). A slot is only replaced when it is not active, so a power cut or a kill at
any point leaves exactly one complete pack active; ``converge()`` tidies the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model_packs.fileio import atomic_write_bytes, fsync_dir

SLOTS = ("a", "b")


@dataclass
class StoreState:
    active: str | None = None
    previous: str | None = None
    versions: dict[str, str] = field(default_factory=dict)  # slot -> "name@version"
    trial: bool = False  # activated, the first health probe after the switch still pending
    trial_boots: int = 0
    last_outcome: dict[str, Any] = field(default_factory=dict)


class PackStore:
    def __init__(self, state_dir: Path) -> None:
        """No IO here: directories are made by :meth:`converge` or the first write."""
        self.root = state_dir / "packs"
        self.state_file = self.root / "state.json"
        self.staging = self.root / "staging"
        self.downloads = self.root / "downloads"

    def ensure_dirs(self) -> None:
        self.downloads.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ state

    def state(self) -> StoreState:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return StoreState()
        return StoreState(**data)

    def _save(self, state: StoreState) -> None:
        self.ensure_dirs()
        atomic_write_bytes(self.state_file, json.dumps(asdict(state), indent=2).encode())

    def slot_path(self, slot: str) -> Path:
        return self.root / slot

    def active_path(self) -> Path | None:
        st = self.state()
        return self.slot_path(st.active) if st.active else None

    def active_version(self) -> str | None:
        st = self.state()
        return st.versions.get(st.active or "", "").partition("@")[2] or None

    # ------------------------------------------------------------ acting

    def fresh_staging(self) -> Path:
        self.ensure_dirs()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self.staging

    def activate_staged(self, label: str) -> str:
        """Move the checked staging dir into the non-active slot and switch to it."""
        st = self.state()
        slot = next(s for s in SLOTS if s != st.active)
        target = self.slot_path(slot)
        if target.exists():
            trash = self.root / f".trash-{slot}"
            shutil.rmtree(trash, ignore_errors=True)
            target.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        self.staging.rename(target)
        fsync_dir(self.root)
        st.versions[slot] = label
        st.previous, st.active = st.active, slot
        st.trial, st.trial_boots = True, 0
        self._save(st)  # <- the switch
        return slot

    def seed(self, pack_dir: Path, label: str) -> str:
        """First pack of an empty store (provisioning): copied, then switched to."""
        staging = self.fresh_staging()
        for p in pack_dir.iterdir():
            if p.is_file():
                _link_or_copy(p, staging / p.name)
        slot = self.activate_staged(label)
        self.confirm()
        return slot

    def confirm(self) -> None:
        """The active pack passed its first health probe after the switch."""
        st = self.state()
        st.trial, st.trial_boots = False, 0
        self._save(st)

    def note_boot(self) -> StoreState:
        """Count starts of a pack still on trial (a crash loop rolls back)."""
        st = self.state()
        if st.trial:
            st.trial_boots += 1
            self._save(st)
        return st

    def rollback(self, reason: str) -> bool:
        """Switch back to the previous slot; False if there is none."""
        st = self.state()
        if not st.previous or not self.slot_path(st.previous).is_dir():
            return False
        failed = st.active
        st.active, st.previous = st.previous, None
        st.trial, st.trial_boots = False, 0
        st.last_outcome = {
            "state": "rolled_back",
            "reason": reason,
            "failed": st.versions.get(failed or ""),
            "ts": time.time(),
        }
        self._save(st)
        return True

    def record(self, outcome: dict[str, Any]) -> None:
        st = self.state()
        st.last_outcome = {**outcome, "ts": time.time()}
        self._save(st)

    def converge(self) -> None:
        """After a restart: drop half-done staging and trash; the state file decides."""
        self.ensure_dirs()
        shutil.rmtree(self.staging, ignore_errors=True)
        for trash in self.root.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)
        for tmp in self.root.glob(".state.json.*.tmp"):  # a write cut short
            tmp.unlink(missing_ok=True)
        st = self.state()
        if st.active and not self.slot_path(st.active).is_dir() and st.previous:
            self.rollback("active slot missing after restart")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Packs are immutable (rebuilt packs get new files), so a hard link is a safe copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
