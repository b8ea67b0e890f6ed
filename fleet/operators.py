"""Operator keys: the Ed25519 keys that sign update instructions and privileged commands
(model_packs/instructions.py). Each operator (and the fleet's rollout service) has its own;
devices are provisioned with the public halves (``security.operator_keys``).

The private key is written 0600 and, when a passphrase is given (``EDGE_FLEET_KEY_PASSPHRASE``),
encrypted (PKCS#8, the best available scheme), so a copied key file alone signs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.errors import RepositoryError
from model_packs.instructions import PASSPHRASE_ENV, key_id, load_signing_key


def passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def create_operator_key(out: Path, name: str) -> tuple[Path, Path, str]:
    """``out/NAME.key`` (private, 0600, encrypted with the passphrase when one is set) and
    ``out/NAME.pub`` (public, for the devices); returns both paths and the key id."""
    private, public = out / f"{name}.key", out / f"{name}.pub"
    if private.exists() or public.exists():
        raise RepositoryError(f"{private} or {public} exists already; an operator key is never overwritten")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    secret = passphrase()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public, key_id(key.public_key())


def signing_key(path: Path) -> Ed25519PrivateKey:
    """An operator's private key (model_packs.instructions.load_signing_key), as a fleet error."""
    try:
        return load_signing_key(path)
    except ValueError as exc:
        raise RepositoryError(f"cannot use signing key {path}: {exc}") from None
