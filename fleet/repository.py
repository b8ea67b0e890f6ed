"""The fleet's signed pack repository: TUF metadata (python-tuf) plus pack tarballs.

Static layout, servable by any HTTP server or CDN::

    REPO/metadata/{N.root.json, root.json, targets.json, snapshot.json, timestamp.json}
    REPO/targets/packs/{name}/{version}.tar

Signing keys live in ``KEYS/`` (0700, files 0600): ``KEYS/root/`` holds the root keys
(2-of-3 by default; keep them offline: only ``init`` and ``keys rotate`` need them),
``KEYS/online/`` the targets, snapshot and timestamp keys.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from fleet.errors import RepositoryError
from model_packs.format import verify_pack

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
CREATED_FIELD = "x-edge-created"
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


def semver_key(version: str) -> tuple[int, int, int]:
    m = _SEMVER.match(version)
    if not m:
        raise RepositoryError(f"version {version!r} is not SemVer")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def target_path(name: str, version: str) -> str:
    return f"packs/{name}/{version}.tar"


def write_pack_tarball(pack_dir: Path, dest: Path) -> None:
    """A deterministic tar of the pack (sorted names, no owners, mtime 0), streamed to
    ``dest`` through a temp file and renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tmp.open("wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in pack_dir.iterdir() if p.is_file()):
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode = 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)


@dataclass(frozen=True)
class PublishedPack:
    path: str
    length: int
    sha256: str
    version: int  # targets metadata version


class KeyStore:
    """Private keys as PEM files with restrictive permissions."""

    def __init__(self, keys_dir: Path) -> None:
        self.dir = keys_dir

    def _role_dir(self, role: str) -> Path:
        return self.dir / ("root" if role == "root" else "online") / role

    def add(self, role: str, signer: CryptoSigner) -> None:
        d = self._role_dir(role)
        d.mkdir(parents=True, exist_ok=True)
        for parent in (self.dir, d.parent, d):
            os.chmod(parent, 0o700)
        path = d / f"{signer.public_key.keyid[:16]}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(signer.private_bytes)

    def remove(self, role: str, keyid: str) -> None:
        (self._role_dir(role) / f"{keyid[:16]}.pem").unlink(missing_ok=True)

    def signers(self, role: str, root: Root) -> list[Signer]:
        """Signers for the keys ``root`` lists for ``role`` that we hold."""
        d = self._role_dir(role)
        if not d.is_dir():
            where = "the offline root keys" if role == "root" else f"the {role} key"
            raise RepositoryError(f"{where} are not in {d}: this command needs them")
        out: list[Signer] = []
        for keyid in root.roles[role].keyids:
            path = d / f"{keyid[:16]}.pem"
            if path.exists():
                priv = load_pem_private_key(path.read_bytes(), password=None)
                out.append(CryptoSigner(priv, root.get_key(keyid)))  # type: ignore[arg-type]
        return out


class FleetRepository:
    def __init__(self, repo_dir: Path, keys_dir: Path, clock: Callable[[], datetime] | None = None) -> None:
        self.dir = repo_dir
        self.meta_dir = repo_dir / "metadata"
        self.targets_dir = repo_dir / "targets"
        self.keys = KeyStore(keys_dir)
        self._now = clock or (lambda: datetime.now(UTC))

    # ------------------------------------------------------------ helpers

    def _expiry(self, role: str) -> datetime:
        return (self._now() + DEFAULT_EXPIRY[role]).replace(microsecond=0)

    def load(self, role: str) -> Metadata[Any]:
        path = self.meta_dir / f"{role}.json"
        if not path.exists():
            raise RepositoryError(f"{path} not found: run `edge-fleet repo init` first")
        return Metadata.from_file(str(path))

    def root(self) -> Root:
        root: Root = self.load("root").signed
        return root

    def _write(self, md: Metadata[Any], role: str, signers: list[Signer], versioned: bool = False) -> None:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        names = [f"{role}.json"] + ([f"{md.signed.version}.{role}.json"] if versioned else [])
        data = md.to_bytes(JSONSerializer(compact=False))
        for name in names:
            _atomic_write(self.meta_dir / name, data)

    # ------------------------------------------------------------ commands

    def init(self, root_keys: int = 3, root_threshold: int = 2) -> None:
        if (self.meta_dir / "root.json").exists():
            raise RepositoryError(f"{self.meta_dir} already holds a repository")
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        root = Root(expires=self._expiry("root"), consistent_snapshot=False)
        # signed with the root: a device whose clock is earlier than this cannot judge expiry
        root.unrecognized_fields[CREATED_FIELD] = self._now().replace(microsecond=0).isoformat()
        signers: dict[str, list[CryptoSigner]] = {}
        for role in ("root", *ONLINE_ROLES):
            signers[role] = [
                CryptoSigner.generate_ed25519() for _ in range(root_keys if role == "root" else 1)
            ]
            for s in signers[role]:
                root.add_key(s.public_key, role)
                self.keys.add(role, s)
        root.roles["root"].threshold = root_threshold
        self._write(Metadata(root), "root", list(signers["root"]), versioned=True)
        self._write(Metadata(Targets(expires=self._expiry("targets"))), "targets", list(signers["targets"]))
        self._snapshot_and_timestamp(root)

    def _snapshot_and_timestamp(self, root: Root) -> None:
        targets_version = self.load("targets").signed.version
        try:
            snap: Metadata[Snapshot] = self.load("snapshot")
            snap.signed.version += 1
        except RepositoryError:
            snap = Metadata(Snapshot(expires=self._expiry("snapshot")))
        snap.signed.meta["targets.json"] = MetaFile(version=targets_version)
        snap.signed.expires = self._expiry("snapshot")
        self._write(snap, "snapshot", self.keys.signers("snapshot", root))
        self.refresh_timestamp(root)

    def refresh_timestamp(self, root: Root | None = None) -> int:
        root = root or self.root()
        try:
            ts: Metadata[Timestamp] = self.load("timestamp")
            ts.signed.version += 1
        except RepositoryError:
            ts = Metadata(Timestamp(expires=self._expiry("timestamp")))
        ts.signed.snapshot_meta = MetaFile(version=self.load("snapshot").signed.version)
        ts.signed.expires = self._expiry("timestamp")
        self._write(ts, "timestamp", self.keys.signers("timestamp", root))
        return int(ts.signed.version)

    def published_versions(self, name: str) -> list[str]:
        targets: Targets = self.load("targets").signed
        prefix = f"packs/{name}/"
        return [p[len(prefix) : -4] for p in targets.targets if p.startswith(prefix)]

    def publish(
        self,
        pack_dir: Path,
        min_agent_version: str = "0.1.0",
        hardware: tuple[str, ...] = ("any",),
        rollback: bool = False,
    ) -> PublishedPack:
        """Add a verified pack as a target; versions of one pack only go up."""
        manifest = verify_pack(pack_dir)
        if not manifest.evaluation.passed:
            raise RepositoryError(f"pack {manifest.name} {manifest.version} did not pass its quality gate")
        newest = max(self.published_versions(manifest.name), key=semver_key, default=None)
        if newest and semver_key(manifest.version) <= semver_key(newest) and not rollback:
            raise RepositoryError(
                f"{manifest.name} {manifest.version} is not above the published {newest}: "
                "versions only go up; to roll the fleet back, publish it with --rollback "
                "(a signed rollback instruction)"
            )
        path = target_path(manifest.name, manifest.version)
        write_pack_tarball(pack_dir, self.targets_dir / path)
        custom = {
            "name": manifest.name,
            "version": manifest.version,
            "min_agent_version": min_agent_version,
            "hardware": list(hardware),
            "min_ram_mb": manifest.runtime.min_ram_mb,
            **({"rollback": True} if rollback else {}),
        }
        tf = TargetFile.from_file(path, str(self.targets_dir / path), ["sha256"])
        tf.unrecognized_fields["custom"] = custom
        root = self.root()
        md: Metadata[Targets] = self.load("targets")
        md.signed.targets[path] = tf
        md.signed.version += 1
        md.signed.expires = self._expiry("targets")
        self._write(md, "targets", self.keys.signers("targets", root))
        self._snapshot_and_timestamp(root)
        return PublishedPack(path, tf.length, tf.hashes["sha256"], md.signed.version)

    def rotate(self, role: str) -> str:
        """Replace ``role``'s keys with a new one; the new root is signed by the old root
        keys (and the new ones when rotating root), so devices can follow the chain."""
        md: Metadata[Root] = self.load("root")
        root = md.signed
        old_root_signers = self.keys.signers("root", root)
        if len(old_root_signers) < root.roles["root"].threshold:
            raise RepositoryError("rotating a key needs a threshold of the (offline) root keys")
        old_ids = list(root.roles[role].keyids)
        fresh = [CryptoSigner.generate_ed25519() for _ in old_ids]  # same count, same threshold
        for keyid in old_ids:
            root.revoke_key(keyid, role)
        for s in fresh:
            root.add_key(s.public_key, role)
            self.keys.add(role, s)
        root.version += 1
        root.expires = self._expiry("root")
        signers: list[Signer] = [*old_root_signers, *(fresh if role == "root" else [])]
        self._write(md, "root", signers, versioned=True)
        for keyid in old_ids:
            self.keys.remove(role, keyid)
        if role in ONLINE_ROLES:
            self._resign(role, root)
        return ",".join(s.public_key.keyid for s in fresh)

    def _resign(self, role: str, root: Root) -> None:
        md: Metadata[Any] = self.load(role)
        md.signed.version += 1
        self._write(md, role, self.keys.signers(role, root))
        if role == "targets":
            self._snapshot_and_timestamp(root)
        elif role == "snapshot":
            self.refresh_timestamp(root)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
