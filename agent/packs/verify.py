"""Pure checks for an update: target metadata, version rule, tar members. No IO here."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Mapping
from typing import Any

from agent.errors import AgentError

_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


class UpdateRejected(AgentError):
    """An update that must not be installed; ``reason_code`` goes into update/status."""

    code = "update_rejected"

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def semver(version: str) -> tuple[int, int, int]:
    m = _SEMVER.match(version)
    if not m:
        raise UpdateRejected("bad_target", f"version {version!r} is not SemVer")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def parse_target(target: str) -> tuple[str, str, str]:
    """``NAME@VERSION`` -> (name, version, TUF target path)."""
    name, sep, version = target.partition("@")
    if not sep or not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise UpdateRejected("bad_target", f"target {target!r} must be NAME@VERSION")
    semver(version)
    return name, version, f"packs/{name}/{version}.tar"


def check_custom(
    custom: Mapping[str, Any] | None, name: str, version: str, agent_version: str, hardware: str
) -> None:
    """The signed custom metadata must name this pack and suit this agent and board."""
    if not custom:
        raise UpdateRejected("bad_target", "target has no signed pack metadata")
    if custom.get("name") != name or custom.get("version") != version:
        raise UpdateRejected(
            "bad_target", f"signed metadata names {custom.get('name')}@{custom.get('version')}"
        )
    if semver(agent_version) < semver(str(custom.get("min_agent_version", "0.0.0"))):
        raise UpdateRejected(
            "incompatible", f"pack needs agent >= {custom['min_agent_version']}, this is {agent_version}"
        )
    boards = custom.get("hardware") or ["any"]
    if "any" not in boards and hardware not in boards:
        raise UpdateRejected("incompatible", f"pack is for {boards}, this device is {hardware}")


def check_version_goes_up(current: str | None, new: str) -> None:
    """Versions only go up, unless the fleet signed this target as a rollback."""
    if current is not None and semver(new) <= semver(current):
        raise UpdateRejected(
            "downgrade",
            f"{new} is not above the active {current}: versions only go up "
            "(a fleet rollback is a target signed with rollback: true)",
        )


def check_members(members: Iterable[tarfile.TarInfo], max_bytes: int) -> list[tarfile.TarInfo]:
    """Only regular files at the top level, nothing escaping, a bounded total size."""
    out, total = [], 0
    for m in members:
        if not m.isfile() or "/" in m.name or m.name in ("", ".", ".."):
            raise UpdateRejected("bad_pack", f"tar member {m.name!r} is not a plain top-level file")
        total += m.size
        if total > max_bytes:
            raise UpdateRejected("bad_pack", f"pack unpacks to more than {max_bytes} bytes")
        out.append(m)
    if not any(m.name == "manifest.json" for m in out):
        raise UpdateRejected("bad_pack", "pack has no manifest.json at its root")
    return out


def golden_agreement(got: list[int], want: tuple[int, ...]) -> float:
    """Share of the recorded greedy tokens reproduced before the first difference."""
    lead = 0
    for a, b in zip(got, want, strict=False):
        if a != b:
            break
        lead += 1
    return lead / len(want) if want else 1.0
