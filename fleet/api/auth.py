"""Bearer tokens: a file of ``ROLE SHA256-HEX [NAME]`` lines, the token itself never stored.

``edge-fleet token add --role read --tokens FILE`` makes a random token, prints it once and
appends its hash. A request's token is hashed and looked up; the file is re-read when it
changes, so adding or removing a token needs no restart. Roles: ``read`` (every GET) and
``admin`` (also what changes state, e.g. retention runs); admin includes read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import FleetError

ROLES = ("read", "admin")
_LINE = re.compile(r"(read|admin)\s+([0-9a-f]{64})(?:\s+(\S{1,64}))?")


class TokenFileError(FleetError):
    code = "tokens"


@dataclass(frozen=True)
class Grant:
    role: str
    name: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, where: str = "tokens") -> dict[str, Grant]:
    """Hash -> grant; a malformed line is an error (a typo must not lock everyone out silently)."""
    grants: dict[str, Grant] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise TokenFileError(f"{where}:{number}: expected 'read|admin SHA256-HEX [NAME]'")
        role, digest, name = match.groups()
        grants[digest] = Grant(role, name or f"line{number}")
    return grants


class TokenFile:
    """Thread-safe; re-reads the file when its mtime or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._grants: dict[str, Grant] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._grants = parse_tokens(self.path.read_text(), str(self.path))
                self._stamp = stamp
        except OSError as exc:
            raise TokenFileError(f"cannot read the token file {self.path}: {exc.strerror}") from None

    def check(self, token: str) -> Grant | None:
        digest = token_hash(token)
        with self._lock:
            self._reload()
            grants = self._grants
        found = None
        for known, grant in grants.items():  # compare_digest on every entry: no early exit
            if hmac.compare_digest(known, digest):
                found = grant
        return found


def add_token(path: Path, role: str, name: str) -> str:
    """A new random token of ``role``; its hash is appended to ``path`` (created 0600)."""
    if role not in ROLES:
        raise TokenFileError(f"role: one of {', '.join(ROLES)}")
    if not re.fullmatch(r"\S{1,64}", name):
        raise TokenFileError("name: 1 to 64 characters without spaces")
    if path.exists():
        parse_tokens(path.read_text(), str(path))  # refuse to append to a broken file
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{role} {token_hash(token)} {name}\n")
        f.flush()
        os.fsync(f.fileno())
    return token
