"""Operator keys for tests: real Ed25519 keys, written where an agent config can name them."""

from __future__ import annotations

import functools
import tempfile
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from model_packs import instructions


class Operator:
    """One operator: a private key that signs and its public key file a device trusts."""

    def __init__(self, directory: Path, name: str = "ops") -> None:
        self.key = Ed25519PrivateKey.generate()
        self.pub = directory / f"{name}.pub"
        self.pub.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.key_id = instructions.key_id(self.key.public_key())
        self.private = directory / f"{name}.key"  # for the CLIs' --signing-key
        self.private.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    def sign(self, action: str, device: str, seq: int | None = None, **fields: Any) -> dict[str, Any]:
        """The payload of a signed ``action`` for ``device`` (``fields``: id, target, ...)."""
        fields.setdefault("id", uuid.uuid4().hex[:16])
        return instructions.sign(self.key, action, device, {"v": 1, **fields}, seq=seq)


@functools.cache
def default_operator() -> Operator:
    """The operator every test agent trusts (conftest's ``agent_config``)."""
    return Operator(Path(tempfile.mkdtemp(prefix="edge-operator-")))
