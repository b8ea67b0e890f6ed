"""Should this device install this target? Pure rules: no IO, no clock, no network.

Input: the instruction's ``NAME@VERSION``, the signed custom metadata that TUF verified,
the active pack's version, this agent's version and board. Output: a :class:`Plan`, or an
:class:`UpdateRejected` with the reason code that goes into ``update/status``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.packs.verify import UpdateRejected
from model_packs import layout
from model_packs.versions import Version, VersionError, parse_version


@dataclass(frozen=True)
class Plan:
    name: str
    version: str
    path: str  # the TUF target path
    rollback: bool  # a lower version the fleet signed as a rollback instruction


def semver(version: str) -> Version:
    """SemVer precedence, the fleet's rule (model_packs.versions): device and fleet accept
    exactly the same versions."""
    try:
        return parse_version(version)
    except VersionError as exc:
        raise UpdateRejected("bad_target", str(exc)) from None


def parse_target(target: str) -> tuple[str, str, str]:
    """``NAME@VERSION`` -> (name, version, TUF target path)."""
    try:
        name, version, path = layout.parse_target(target)
    except layout.TargetError as exc:
        raise UpdateRejected("bad_target", str(exc)) from None
    return name, version, path


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


def decide(
    target: str,
    custom: Mapping[str, Any] | None,
    active_version: str | None,
    agent_version: str,
    hardware: str,
) -> Plan:
    """Accept ``target`` for this device, or raise the reason it must not be installed."""
    name, version, path = parse_target(target)
    check_custom(custom, name, version, agent_version, hardware)
    rollback = bool(custom and custom.get("rollback") is True)
    if not rollback:
        check_version_goes_up(active_version, version)
    return Plan(name, version, path, rollback)
