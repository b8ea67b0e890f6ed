"""Signed instructions: how an operator or the fleet proves a privileged action is theirs.

An update instruction or a privileged command (``reload``) travels over a shared broker, where
any client can claim any client id or key. So the device acts on it only when it carries an
Ed25519 signature by an operator key the device was provisioned with, names this device, and
is newer than every instruction that key signed before. The fleet (which signs) and the device
(which verifies) both use this module; neither trusts anything outside the signed bytes.

Envelope, as the MQTT payload (JSON)::

    {"v": 1, "id": "...", "key": KEY_ID, "signed": BASE64(BODY), "sig": BASE64(SIGNATURE)}

``BODY`` is a UTF-8 JSON object, signed byte for byte (no canonical form needed)::

    {"action": "update" | "reload", "device": DEVICE_ID, "seq": INT, ...the action's fields}

- ``device``: the one device it is for; an instruction for another device is refused.
- ``seq``: strictly greater than the last one the device accepted from this key, so a captured
  instruction cannot be replayed, and nothing depends on the device's clock (a board without
  an RTC boots in 1970). Senders use microseconds since the epoch of their own clock.
- ``KEY_ID``: the first 16 hex digits of the SHA-256 of the raw 32-byte public key.

Each refusal has its own stable code: ``unauthorized`` (no envelope, malformed, unknown key,
bad signature), ``wrong_device``, ``replayed``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ACTIONS = ("update", "reload")
MAX_BODY_BYTES = 4096


class InstructionRefused(Exception):
    """A signed instruction that must not be acted on; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Instruction:
    """A verified instruction: the signed body and the key that signed it."""

    action: str
    device: str
    seq: int
    key_id: str
    body: Mapping[str, Any]


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An operator's Ed25519 public key (PEM, as ``edge-fleet keys operator`` writes it)."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


PASSPHRASE_ENV = "EDGE_FLEET_KEY_PASSPHRASE"


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An operator's private key, decrypted with ``$EDGE_FLEET_KEY_PASSPHRASE`` when it is
    encrypted: what `edge-fleet update send` and `edge-agent cmd reload` sign with. Raises
    ValueError (with the reason) when it cannot be used."""
    secret = os.environ.get(PASSPHRASE_ENV)
    try:
        return load_private_key(path, secret.encode() if secret else None)
    except (OSError, TypeError, ValueError) as exc:
        raise ValueError(f"{exc} (passphrase in ${PASSPHRASE_ENV}?)") from None


def sign(
    key: Ed25519PrivateKey, action: str, device: str, fields: Mapping[str, Any], seq: int | None = None
) -> dict[str, Any]:
    """The envelope of ``action`` for ``device``; ``fields`` are the action's own (target, ...)."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}")
    body = {
        **fields,
        "action": action,
        "device": device,
        "seq": seq if seq is not None else time.time_ns() // 1000,
    }
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return {
        "v": 1,
        "id": str(fields.get("id", "")),
        "key": key_id(key.public_key()),
        "signed": base64.b64encode(raw).decode("ascii"),
        "sig": base64.b64encode(key.sign(raw)).decode("ascii"),
    }


def _b64(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4:
        raise InstructionRefused(
            "unauthorized", f"{what} is missing or too long: privileged actions must be signed"
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InstructionRefused("unauthorized", f"{what} is not base64") from None


def verify(
    data: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey], action: str, device: str
) -> Instruction:
    """Check an envelope against the trusted ``keys`` (by key id), for ``action`` on
    ``device``; returns the signed instruction or raises :class:`InstructionRefused`. Replay
    (``seq``) is the caller's to check against what it accepted before."""
    kid = data.get("key")
    public = keys.get(kid) if isinstance(kid, str) else None
    raw = _b64(data.get("signed"), "signed", MAX_BODY_BYTES)
    sig = _b64(data.get("sig"), "sig", 64)
    if public is None:
        raise InstructionRefused(
            "unauthorized", f"key {str(kid)[:40]!r} is not an operator key this device trusts"
        )
    try:
        public.verify(sig, raw)
    except InvalidSignature:
        raise InstructionRefused("unauthorized", "the signature does not match the signed body") from None
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InstructionRefused("unauthorized", "the signed body is not JSON") from None
    seq = body.get("seq") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise InstructionRefused("unauthorized", "the signed body lacks action, device or seq")
    if body.get("action") != action:
        raise InstructionRefused(
            "unauthorized", f"signed for {str(body.get('action'))[:20]!r}, not {action!r}"
        )
    if body.get("device") != device:
        raise InstructionRefused(
            "wrong_device", f"signed for device {str(body.get('device'))[:64]!r}, this is {device!r}"
        )
    return Instruction(action, device, seq, kid, body)  # type: ignore[arg-type]
