"""Device identities on the fleet's broker: provisioning and revocation.

A shared broker is safe only when every client authenticates and the ACL follows the
authenticated identity (mosquitto's ``%u``), never the client id a client chooses. Each device
authenticates as its device id with its own random password; its ACL confines it to its own
tree (``edge/<id>/#``) plus the reply area. Operators authenticate as themselves and may send
requests to any device and read their own replies. Privileged actions are additionally signed
(model_packs/instructions.py): a stolen broker password alone updates nothing.

- :func:`provision` writes what a new device needs into one directory (its config, the fleet's
  trusted TUF root, the operators' public keys, its broker password, 0600) and adds its entry
  to the broker's password file (mosquitto's PBKDF2-SHA512 ``$7$`` format).
- :func:`revoke` removes the entry (send the broker SIGHUP to apply it) and records the device
  as revoked, so a later provision under the same id is a deliberate ``--force``.
- :func:`write_acl` writes the ACL file the broker config names (``acl_file``), with a block
  for each operator and for each fleet ingest login (reads the devices' telemetry, status and
  update events; writes only the telemetry acks, ``edge/+/telemetry/ack``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from fleet.errors import RepositoryError

ITERATIONS = 101  # what mosquitto_passwd writes for $7$ (PBKDF2-SHA512)
_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def password_entry(user: str, password: str, salt: bytes | None = None) -> str:
    """One line of a mosquitto password file (``user:$7$101$salt$hash``)."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"{user}:$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _entries(passwd: Path) -> dict[str, str]:
    if not passwd.exists():
        return {}
    out = {}
    for line in passwd.read_text().splitlines():
        user, sep, _ = line.partition(":")
        if sep:
            out[user] = line
    return out


def _write_entries(passwd: Path, entries: dict[str, str]) -> None:
    tmp = passwd.with_name(f".{passwd.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{line}\n" for line in entries.values()))
    os.replace(tmp, passwd)


def _revoked_file(passwd: Path) -> Path:
    return passwd.with_name(f"{passwd.name}.revoked.json")


def add_user(passwd: Path, user: str, password: str, force: bool = False) -> None:
    """Add (or with ``force`` replace) ``user``'s entry in the broker's password file."""
    entries = _entries(passwd)
    revoked = _revoked(passwd)
    if (user in entries or user in revoked) and not force:
        state = "revoked" if user in revoked else "provisioned"
        raise RepositoryError(f"{user} is already {state}; pass --force to issue new credentials")
    entries[user] = password_entry(user, password)
    _write_entries(passwd, entries)
    if user in revoked:
        revoked.remove(user)
        _revoked_file(passwd).write_text(json.dumps(sorted(revoked)))


def _revoked(passwd: Path) -> set[str]:
    path = _revoked_file(passwd)
    return set(json.loads(path.read_text())) if path.exists() else set()


@dataclass(frozen=True)
class Provisioned:
    directory: Path
    config: Path
    password_file: Path


def provision(
    device_id: str,
    out: Path,
    trusted_root: Path,
    operator_keys: list[Path],
    broker_url: str,
    passwd: Path,
    repository_url: str | None = None,
    force: bool = False,
) -> Provisioned:
    """Everything device ``device_id`` needs, in ``out/device_id``; its broker entry in ``passwd``."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise RepositoryError(f"device id {device_id[:80]!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if not operator_keys:
        raise RepositoryError("name at least one --operator-key: a device must trust someone to update it")
    d = out / device_id
    if d.exists() and not force:
        raise RepositoryError(f"{d} exists; pass --force to provision {device_id} again")
    (d / "operators").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trusted_root, d / "root.json")
    keys = []
    for k in operator_keys:
        shutil.copyfile(k, d / "operators" / k.name)
        keys.append(f"/etc/edge-agent/operators/{k.name}")
    password = secrets.token_urlsafe(24)
    add_user(passwd, device_id, password, force)
    secret = d / "mqtt-password"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    config = {
        "device_id": device_id,
        "mqtt": {"url": broker_url, "username": device_id, "password": password},
        "updates": {"trusted_root": "/etc/edge-agent/root.json", "repository_url": repository_url},
        "security": {"operator_keys": keys},
    }
    cfg = d / "agent.yaml"
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the broker password
    with os.fdopen(fd, "w") as fh:
        fh.write(
            f"# edge-fleet device provision {device_id}: install as /etc/edge-agent/agent.yaml (0640 "
            "root:edge-agent),\n# root.json and operators/ beside it; add sensors and pack settings.\n"
        )
        yaml.safe_dump(config, fh, sort_keys=False)
    return Provisioned(d, cfg, secret)


def revoke(device_id: str, passwd: Path) -> bool:
    """Remove the device's broker entry and record it as revoked; True when it had one."""
    entries = _entries(passwd)
    had = entries.pop(device_id, None) is not None
    _write_entries(passwd, entries)
    revoked = _revoked(passwd) | {device_id}
    _revoked_file(passwd).write_text(json.dumps(sorted(revoked)))
    return had


ACL_HEADER = """\
# edge-fleet broker acl: access by authenticated identity (%u = the username), never by the
# client id a client picks. Devices log in as their device id (edge-fleet device provision).
# Every user: its own device tree, and the replies addressed to it.
pattern readwrite edge/%u/#
pattern read edge-ops/%u/#
# devices publish replies where their requesters asked (the agent's replies.allowed_topics)
pattern write edge-ops/#
"""


def ingest_acl(user: str, rollouts: bool = False) -> str:
    """The ACL block of a fleet ingest worker's login (``edge-fleet ingest``/``service``): it
    reads what devices publish for the fleet (its shared subscriptions are checked against the
    topic after ``$share/GROUP/``) and writes the retained telemetry acks, which tell a device
    it may delete records. With ``rollouts`` (a service started with ``--signing-key``) it also
    writes update instructions (signed: a device still checks the key); the devices' replies
    to them reach it under ``edge-ops/USER/`` by the common pattern. Nothing else in a
    device's tree: no queries, reads or commands."""
    return (
        f"\nuser {user}\n"
        + "".join(f"topic read edge/+/{leaf}\n" for leaf in ("telemetry", "status", "update/status"))
        + "topic write edge/+/telemetry/ack\n"
        + ("topic write edge/+/update\n" if rollouts else "")
    )


def write_acl(
    path: Path,
    operators: list[str],
    ingest: list[str] | tuple[str, ...] = (),
    fleet: list[str] | tuple[str, ...] = (),
) -> None:
    """The ACL file: the patterns above, for each operator requests to any device, for each
    ingest-only login (``ingest``) :func:`ingest_acl`, and for each fleet service that drives
    rollouts (``fleet``) the same with update instructions."""
    lines = [ACL_HEADER]
    for name in (*operators, *ingest, *fleet):
        if not _DEVICE_ID.fullmatch(name):
            raise RepositoryError(f"broker user {name[:80]!r} must be 1-64 letters, digits, '.', '_' or '-'")
    for op in operators:
        lines.append(
            f"\nuser {op}\n"
            + "".join(f"topic write edge/+/{leaf}\n" for leaf in ("query", "read", "cmd", "update"))
            + "topic read edge/+/status\ntopic read edge/+/update/status\n"
        )
    lines += [ingest_acl(user) for user in ingest]
    lines += [ingest_acl(user, rollouts=True) for user in fleet]
    path.write_text("".join(lines))
