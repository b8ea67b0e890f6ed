"""The fleet's root keys: created encrypted, in their own (offline) directory, never needed for
day-to-day publishing, and asked for (with the passphrase) by the commands that need them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tuf.api.metadata import Metadata

FLEET = [sys.executable, "-m", "fleet.cli"]


def _run(*args: str, passphrase: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_FLEET_ROOT_PASSPHRASE"}
    if passphrase is not None:
        env["EDGE_FLEET_ROOT_PASSPHRASE"] = passphrase
    return subprocess.run([*FLEET, *args], capture_output=True, text=True, timeout=60, env=env)


def test_root_keys_are_encrypted_offline_and_only_rotation_needs_them(
    tmp_path: Path, tiny_versions: dict[str, Path]
) -> None:
    repo, keys, offline = tmp_path / "repo", tmp_path / "online", tmp_path / "usb-stick"
    common = ["--repo", str(repo), "--keys", str(keys)]
    refused = _run("repo", "init", *common, "--root-keys-dir", str(offline))
    assert refused.returncode != 0 and "only ever written encrypted" in refused.stderr
    assert not repo.exists() and not offline.exists()

    done = _run("repo", "init", *common, "--root-keys-dir", str(offline), passphrase="s3cret words")
    assert done.returncode == 0, done.stderr
    root_keys = sorted(offline.glob("*.pem"))
    assert len(root_keys) == 3 and all(b"ENCRYPTED PRIVATE KEY" in p.read_bytes() for p in root_keys)
    assert all(p.stat().st_mode & 0o077 == 0 for p in root_keys)
    assert not list(keys.rglob("root*/*.pem"))  # nothing of root on the online host

    published = _run("pack", "publish", str(tiny_versions["0.0.2"]), *common)  # no root keys needed
    assert published.returncode == 0, published.stderr

    no_media = _run("keys", "rotate", "targets", *common, passphrase="s3cret words")
    assert no_media.returncode != 0 and "offline root keys" in no_media.stderr
    wrong = _run("keys", "rotate", "targets", *common, "--root-keys-dir", str(offline), passphrase="guess")
    assert wrong.returncode != 0 and "passphrase does not open it" in wrong.stderr
    rotated = _run(
        "keys", "rotate", "targets", *common, "--root-keys-dir", str(offline), passphrase="s3cret words"
    )
    assert rotated.returncode == 0, rotated.stderr
    assert Metadata.from_file(str(repo / "metadata" / "root.json")).signed.version == 2
