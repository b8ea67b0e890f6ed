"""The fleet's signed pack repository: TUF metadata (python-tuf) plus pack tarballs.

Static layout, servable by any HTTP server or CDN. With consistent snapshots (the
default, TUF spec 5.7.3)::

    REPO/metadata/{N.root.json, N.targets.json, N.snapshot.json, timestamp.json}
    REPO/targets/packs/{name}/{SHA256}.{version}.tar

Every file but ``timestamp.json`` is written once under a name that its content decides
(a version or a hash) and never rewritten, and ``timestamp.json`` is written last: a
reader, or a CDN cache, that saw an older timestamp still finds every file it names, so a
publish never races a download. ``root.json``, ``targets.json`` and ``snapshot.json`` are
also kept unversioned, as the repository's own record of what is current. Without
consistent snapshots (``init(consistent_snapshot=False)``) targets are plain
``packs/{name}/{version}.tar`` and only root is versioned.

Signing keys live in ``KEYS/`` (0700, files 0600): ``KEYS/online/`` the targets, snapshot and
timestamp keys, and the root keys (2-of-3 by default) in ``KEYS/root/`` or, better, a separate
directory on offline media (``root_keys_dir``), encrypted with a passphrase: only ``init`` and
``keys rotate`` need them, and the CLI never writes them unencrypted.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from fleet.errors import RepositoryError
from model_packs.fileio import atomic_write_bytes, atomic_writer, fsync_dir, sha256_file
from model_packs.format import MANIFEST_NAME, read_manifest, verify_pack
from model_packs.layout import CREATED_FIELD, consistent_path, pack_of_path, target_path, variant_path
from model_packs.versions import Version, VersionError, parse_version

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}


def semver_key(version: str) -> Version:
    """SemVer precedence of ``version`` (model_packs.versions); RepositoryError if invalid."""
    try:
        return parse_version(version)
    except VersionError as exc:
        raise RepositoryError(str(exc)) from None


def write_pack_tarball(pack_dir: Path, out: BinaryIO) -> None:
    """A deterministic tar of the pack (sorted names, no owners, mtime 0) streamed to
    ``out``: the same pack gives the same bytes, so the same hash and target name. Exactly
    the manifest and the files it lists go in; a symlink is refused, never followed (one
    to the signing keys would otherwise end up inside a signed, served tar)."""
    names = sorted({MANIFEST_NAME, *read_manifest(pack_dir).files})
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in (pack_dir / n for n in names):
            if path.is_symlink() or not path.is_file():
                raise RepositoryError(f"{path} is not a regular file: packs are published from real files")
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode = 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)


@dataclass(frozen=True)
class PublishedPack:
    path: str  # the TUF target path, packs/{name}/{version}.tar
    length: int
    sha256: str
    version: int  # targets metadata version
    file: Path  # the tarball in the repository (hash-prefixed name with consistent snapshots)


class KeyStore:
    """Private keys as PEM files with restrictive permissions; root keys optionally in their
    own (offline) directory and encrypted with ``root_passphrase``."""

    def __init__(
        self, keys_dir: Path, root_dir: Path | None = None, root_passphrase: bytes | None = None
    ) -> None:
        self.dir = keys_dir
        self.root_dir = root_dir
        self.root_passphrase = root_passphrase

    def _role_dir(self, role: str) -> Path:
        if role == "root" and self.root_dir is not None:
            return self.root_dir
        return self.dir / ("root" if role == "root" else "online") / role

    def _pem(self, role: str, signer: CryptoSigner) -> bytes:
        if role != "root" or not self.root_passphrase:
            return signer.private_bytes
        key = load_pem_private_key(signer.private_bytes, password=None)
        encryption = serialization.BestAvailableEncryption(self.root_passphrase)
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    def add(self, role: str, signer: CryptoSigner) -> None:
        d = self._role_dir(role)
        d.mkdir(parents=True, exist_ok=True)
        for parent in {self.dir, d.parent, d} if d.is_relative_to(self.dir) else {d}:
            os.chmod(parent, 0o700)
        path = d / f"{signer.public_key.keyid[:16]}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._pem(role, signer))

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
                out.append(CryptoSigner(self._load(path, role), root.get_key(keyid)))  # type: ignore[arg-type]
        return out

    def _load(self, path: Path, role: str) -> Any:
        data = path.read_bytes()
        encrypted = b"ENCRYPTED" in data
        if encrypted and not (role == "root" and self.root_passphrase):
            raise RepositoryError(f"{path} is encrypted: set EDGE_FLEET_ROOT_PASSPHRASE")
        try:
            return load_pem_private_key(data, password=self.root_passphrase if encrypted else None)
        except ValueError:
            raise RepositoryError(f"{path}: the root passphrase does not open it") from None


class FleetRepository:
    def __init__(
        self,
        repo_dir: Path,
        keys_dir: Path,
        clock: Callable[[], datetime] | None = None,
        root_keys_dir: Path | None = None,
        root_passphrase: bytes | None = None,
    ) -> None:
        self.dir = repo_dir
        self.meta_dir = repo_dir / "metadata"
        self.targets_dir = repo_dir / "targets"
        self.keys = KeyStore(keys_dir, root_keys_dir, root_passphrase)
        self._now = clock or (lambda: datetime.now(UTC))

    # ------------------------------------------------------------ reading

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

    def published_versions(self, name: str) -> list[str]:
        targets: Targets = self.load("targets").signed
        packs = (pack_of_path(p) for p in targets.targets)
        return [pack[1] for pack in packs if pack is not None and pack[0] == name]

    def target_file(self, path: str) -> Path:
        """Where the file of published target ``path`` lies in this repository: what a
        reader downloads, hash-prefixed when the root says consistent_snapshot."""
        targets: Targets = self.load("targets").signed
        if path not in targets.targets:
            raise RepositoryError(f"{path} is not a published target")
        return self._file_of(targets.targets[path], self.root())

    def _file_of(self, target: TargetFile, root: Root) -> Path:
        if not root.consistent_snapshot:
            return self.targets_dir / target.path
        return self.targets_dir / consistent_path(target.path, next(iter(target.hashes.values())))

    # ------------------------------------------------------------ writing

    def _write(self, md: Metadata[Any], role: str, signers: list[Signer]) -> None:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        self._store(role, md.signed.version, md.to_bytes(JSONSerializer(compact=False)))

    def _store(self, role: str, version: int, data: bytes) -> None:
        """The versioned copy first (what a reader fetches: root always, targets and snapshot
        with consistent snapshots), then the unversioned file that says what is current."""
        if role == "root" or (role != "timestamp" and self.root().consistent_snapshot):
            self._store_versioned(role, version, data)
        atomic_write_bytes(self.meta_dir / f"{role}.json", data)

    def _store_versioned(self, role: str, version: int, data: bytes) -> None:
        """``N.role.json`` is written once: a reader holding an older timestamp may be
        fetching it, so other content under the same version is refused."""
        path = self.meta_dir / f"{version}.{role}.json"
        if path.exists():
            if path.read_bytes() != data:
                raise RepositoryError(f"{path.name} is already published with other content")
            return
        atomic_write_bytes(path, data)

    def _store_target(self, pack_dir: Path, path: str, root: Root) -> TargetFile:
        """Write the pack's tarball where readers will ask for it. With consistent snapshots
        its hash is part of the name, so it is written under a hidden name first."""
        incoming = (self.targets_dir / path).with_name(f".{Path(path).name}.incoming")
        incoming.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(incoming) as fh:
            write_pack_tarball(pack_dir, fh)
        target = TargetFile(incoming.stat().st_size, {"sha256": sha256_file(incoming)}, path)
        dest = self._file_of(target, root)
        os.replace(incoming, dest)
        fsync_dir(dest.parent)
        return target

    # ------------------------------------------------------------ commands

    def init(self, root_keys: int = 3, root_threshold: int = 2, consistent_snapshot: bool = True) -> None:
        """A new repository with fresh keys. ``consistent_snapshot`` (TUF spec 5.7.3, on by
        default) names files by version and hash so a publish never races a reader."""
        if (self.meta_dir / "root.json").exists():
            raise RepositoryError(f"{self.meta_dir} already holds a repository")
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        root = Root(expires=self._expiry("root"), consistent_snapshot=consistent_snapshot)
        # signed with the root: a device whose clock is earlier than this cannot judge expiry
        root.unrecognized_fields[CREATED_FIELD] = self._now().replace(microsecond=0).isoformat()
        signers = self._generate_keys(root, root_keys)
        root.roles["root"].threshold = root_threshold
        self._write(Metadata(root), "root", list(signers["root"]))
        self._write(Metadata(Targets(expires=self._expiry("targets"))), "targets", list(signers["targets"]))
        self._snapshot_and_timestamp(root)

    def _generate_keys(self, root: Root, root_keys: int) -> dict[str, list[CryptoSigner]]:
        """``root_keys`` keys for root, one for each online role; added to ``root`` and kept."""
        signers: dict[str, list[CryptoSigner]] = {}
        for role in ("root", *ONLINE_ROLES):
            count = root_keys if role == "root" else 1
            signers[role] = [CryptoSigner.generate_ed25519() for _ in range(count)]
            for s in signers[role]:
                root.add_key(s.public_key, role)
                self.keys.add(role, s)
        return signers

    def republish_snapshot(self) -> int:
        """Publish ``targets.json`` as it now is on disk under a new snapshot and timestamp.

        For targets metadata signed outside this class (an offline or hardware targets key,
        another tool, or a test forging one): it is published byte for byte, never re-signed
        here, so devices judge its signatures themselves. With consistent snapshots it is
        also stored as ``N.targets.json``, the name readers fetch. Returns the new snapshot
        version.
        """
        root = self.root()
        if root.consistent_snapshot:
            data = (self.meta_dir / "targets.json").read_bytes()
            self._store_versioned("targets", Metadata.from_bytes(data).signed.version, data)
        return self._snapshot_and_timestamp(root)

    def _snapshot_and_timestamp(self, root: Root) -> int:
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
        return int(snap.signed.version)

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

    def publish(
        self,
        pack_dir: Path,
        min_agent_version: str = "0.1.0",
        hardware: tuple[str, ...] = ("any",),
        rollback: bool = False,
    ) -> PublishedPack:
        """Add a verified pack as a target; versions of one pack only go up.

        The first pack of a release (``NAME@VERSION``) is its base target. Another pack of the
        same release at another level is a variant for ``hardware`` (never ``any``: the base is
        for any hardware); it is stored at its own path and listed in the base target's signed
        ``custom.variants``, where devices look for it (model_packs/hardware.py)."""
        manifest = verify_pack(pack_dir)
        if not manifest.evaluation.passed:
            raise RepositoryError(f"pack {manifest.name} {manifest.version} did not pass its quality gate")
        root = self.root()
        md: Metadata[Targets] = self.load("targets")
        base = md.signed.targets.get(target_path(manifest.name, manifest.version))
        custom: dict[str, Any] = {
            "name": manifest.name,
            "version": manifest.version,
            "variant": manifest.variant,
            "min_agent_version": min_agent_version,
            "hardware": list(hardware),
            "min_ram_mb": manifest.runtime.min_ram_mb,
            **({"rollback": True} if rollback else {}),
        }
        if base is not None and _custom(base).get("variant", manifest.variant) != manifest.variant:
            path = self._add_variant(base, manifest.variant, hardware, manifest.runtime.min_ram_mb)
        else:
            if not rollback:
                self._check_goes_up(manifest.name, manifest.version)
            path = target_path(manifest.name, manifest.version)
        tf = self._store_target(pack_dir, path, root)
        tf.unrecognized_fields["custom"] = custom
        md.signed.targets[path] = tf
        md.signed.version += 1
        md.signed.expires = self._expiry("targets")
        self._write(md, "targets", self.keys.signers("targets", root))
        self._snapshot_and_timestamp(root)
        return PublishedPack(path, tf.length, tf.hashes["sha256"], md.signed.version, self._file_of(tf, root))

    @staticmethod
    def _add_variant(base: TargetFile, variant: str, hardware: tuple[str, ...], min_ram_mb: int) -> str:
        """List a variant in the release's base target (signed with it) with the hardware and
        RAM it is for; its target path. A variant for any hardware must need less RAM than the
        base: boards too small for the base take it."""
        base_custom = _custom(base)
        base_ram = base_custom.get("min_ram_mb")
        smaller = isinstance(base_ram, int) and min_ram_mb < base_ram
        if not hardware or ("any" in hardware and not smaller):
            raise RepositoryError(
                f"{base_custom.get('name')}@{base_custom.get('version')} is published as "
                f"{base_custom.get('variant')}; a {variant} variant needs --hardware TAG "
                "(e.g. aarch64-no-dotprod), or less RAM than the base for any hardware: the base "
                "is the one for any hardware"
            )
        variants = base_custom.setdefault("variants", {})
        if variant in variants:
            raise RepositoryError(f"variant {variant} of this release is already published")
        variants[variant] = {"hardware": list(hardware), "min_ram_mb": min_ram_mb}
        return variant_path(str(base_custom["name"]), str(base_custom["version"]), variant)

    def _check_goes_up(self, name: str, version: str) -> None:
        newest = max(self.published_versions(name), key=semver_key, default=None)
        if newest is not None and semver_key(version) <= semver_key(newest):
            raise RepositoryError(
                f"{name} {version} is not above the published {newest}: "
                "versions only go up; to roll the fleet back, publish it with --rollback "
                "(a signed rollback instruction)"
            )

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
        self._write(md, "root", signers)
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


def _custom(target: TargetFile) -> dict[str, Any]:
    """A target's signed custom metadata (the fleet's fields), as stored."""
    custom = target.unrecognized_fields.setdefault("custom", {})
    if not isinstance(custom, dict):
        raise RepositoryError(f"{target.path} has malformed custom metadata")
    return custom
