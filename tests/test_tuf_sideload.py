"""The sideload expiry rule reaches into python-tuf's private API: fail loudly, not
quietly wrong, when a tuf release changes what it relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import tuf
from tuf.ngclient import Updater

from agent.packs.tuf_sideload import RELIES_ON, SideloadUnsupported, relax_expiry
from fleet.repository import FleetRepository


def test_the_tuf_release_still_has_what_the_sideload_rule_replaces(tmp_path: Path) -> None:
    assert int(tuf.__version__.split(".")[0]) < 8, "tuf 8 changed; review agent/packs/tuf_sideload.py"
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    (tmp_path / "meta").mkdir()
    root = (repo.meta_dir / "1.root.json").read_bytes()
    updater = Updater(
        str(tmp_path / "meta"), "file:///nowhere/metadata/", "file:///nowhere/targets/", bootstrap=root
    )
    trusted = getattr(updater, RELIES_ON[0])
    for name in RELIES_ON[1:]:
        assert callable(getattr(trusted, name)), f"python-tuf no longer has {name}"
    relax_expiry(updater)
    trusted._check_final_timestamp()  # replaced: no longer raises on expiry


def test_an_updater_without_the_private_parts_is_refused_not_patched() -> None:
    class Changed:
        pass

    with pytest.raises(SideloadUnsupported):
        relax_expiry(Changed())  # type: ignore[arg-type]
