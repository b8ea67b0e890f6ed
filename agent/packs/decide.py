"""Should this device install this target? Pure rules: no IO, no clock, no network.

Input: the instruction's ``NAME@VERSION``, the signed custom metadata that TUF verified,
the active pack's version, this agent's version and hardware tags. Output: a :class:`Plan`, or
an :class:`UpdateRejected` with the reason code that goes into ``update/status``.

Variants: the release's base target lists its variants, the hardware each was published for
and the RAM each needs (``custom.variants``); :func:`choose_variant` takes the first one
published for one of this device's tags (model_packs/hardware.py) that fits its RAM; else, when
the base needs more RAM than the device has, the largest variant that fits; else the base.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from agent.packs.verify import UpdateRejected
from model_packs import hardware as hw
from model_packs import layout
from model_packs.versions import Version, VersionError, parse_version


@dataclass(frozen=True)
class Plan:
    name: str
    version: str
    path: str  # the TUF target path
    rollback: bool  # a lower version the fleet signed as a rollback instruction
    variant: str | None = None  # the release's variant for this hardware; None: the base


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


class Variant(NamedTuple):
    """The variant of a release this device takes, and why."""

    name: str
    path: str  # its TUF target path
    tag: str  # the device's hardware tag it was published for ("ram": chosen for its RAM)
    why: str


class _Listed(NamedTuple):
    name: str
    boards: list[str]
    min_ram_mb: int | None


def _listed(custom: Mapping[str, Any] | None) -> list[_Listed]:
    """The well-formed entries of ``custom.variants``; malformed ones are skipped (the signed
    base still installs)."""
    variants = (custom or {}).get("variants")
    if not isinstance(variants, dict):
        return []
    out = []
    for variant, entry in variants.items():
        boards = entry.get("hardware") if isinstance(entry, dict) else None
        if not isinstance(variant, str) or not layout.is_pack_name(variant) or not isinstance(boards, list):
            continue
        ram = entry.get("min_ram_mb")
        ram_ok = isinstance(ram, int) and not isinstance(ram, bool) and ram > 0
        out.append(_Listed(variant, [b for b in boards if isinstance(b, str)], ram if ram_ok else None))
    return out


def _fits(need: int | None, ram_mb: int | None) -> bool:
    return ram_mb is None or need is None or need <= ram_mb


def choose_variant(
    custom: Mapping[str, Any] | None,
    name: str,
    version: str,
    tags: frozenset[str],
    ram_mb: int | None = None,
) -> Variant | None:
    """The first variant the base target lists for one of ``tags`` (``any`` never selects a
    variant by hardware: the base is for any hardware) whose RAM fits ``ram_mb``; else, when
    the base needs more than ``ram_mb``, the variant needing the most RAM that still fits (the
    best quality this board can hold); else None for the base itself."""
    listed = _listed(custom)
    for v in listed:
        matched = [b for b in v.boards if b != hw.ANY and b in tags]
        if matched and _fits(v.min_ram_mb, ram_mb):
            why = hw.WHY.get(matched[0], f"this device is tagged {matched[0]}")
            return Variant(v.name, layout.variant_path(name, version, v.name), matched[0], why)
    base_ram = (custom or {}).get("min_ram_mb")
    if ram_mb is None or not isinstance(base_ram, int) or base_ram <= ram_mb:
        return None
    suits = [
        v
        for v in listed
        if v.min_ram_mb is not None
        and v.min_ram_mb <= ram_mb
        and (hw.ANY in v.boards or tags.intersection(v.boards))
    ]
    if not suits:
        return None
    best = max(suits, key=lambda v: v.min_ram_mb or 0)
    why = (
        f"the base needs {base_ram} MB of RAM, this device has {ram_mb} MB; "
        f"{best.name} needs {best.min_ram_mb} MB"
    )
    return Variant(best.name, layout.variant_path(name, version, best.name), "ram", why)


def check_custom(
    custom: Mapping[str, Any] | None,
    name: str,
    version: str,
    agent_version: str,
    tags: frozenset[str],
    variant: Variant | None = None,
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
    if variant is not None and custom.get("variant") != variant.name:
        raise UpdateRejected("bad_target", f"signed metadata names variant {custom.get('variant')!r}")
    boards = custom.get("hardware") or [hw.ANY]
    named = [b for b in boards if isinstance(b, str)] if isinstance(boards, list) else []
    if hw.ANY not in named and not tags.intersection(named):
        raise UpdateRejected("incompatible", f"pack is for {boards}, this device is {sorted(tags)}")


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
    tags: frozenset[str],
    variant: Variant | None = None,
) -> Plan:
    """Accept ``target`` (its ``variant`` when one was chosen, whose signed ``custom`` this
    is) for this device, or raise the reason it must not be installed."""
    name, version, path = parse_target(target)
    check_custom(custom, name, version, agent_version, tags, variant)
    if variant is not None:
        path = variant.path
    rollback = bool(custom and custom.get("rollback") is True)
    if not rollback:
        check_version_goes_up(active_version, version)
    return Plan(name, version, path, rollback, variant.name if variant else None)
