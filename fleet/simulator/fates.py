"""Which device misbehaves how: decided by a hash of (seed, device id), never by chance.

A rollout test must know before it starts which devices will fail, roll back or regress, and
a rerun must pick the same ones. Each choice ranks the fleet's ids by ``sha256(seed, salt,
id)`` and takes the first ``round(share * N)``: the counts are exact (20 % of 20 devices is 4,
not "about 4"), and the same (seed, ids) always gives the same devices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from fleet.simulator.config import Shares, hardware_tags

OK, FAIL, ROLLBACK, REGRESS, INCOMPATIBLE = "ok", "fail", "rollback", "regress", "incompatible"
FATES = (OK, FAIL, ROLLBACK, REGRESS, INCOMPATIBLE)


def unit(seed: int, salt: str, device_id: str) -> float:
    """A number in [0, 1) that depends only on its arguments."""
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _ranked(seed: int, salt: str, ids: Sequence[str]) -> list[str]:
    return sorted(ids, key=lambda d: (unit(seed, salt, d), d))


def assign_fates(seed: int, ids: Sequence[str], shares: Shares) -> dict[str, str]:
    """Every id's fate: the first ``round(fail * N)`` ranked ids fail, the next ones roll back,
    regress, are incompatible; the rest are ``ok``."""
    ranked = _ranked(seed, "fate", ids)
    fates = dict.fromkeys(ids, OK)
    start = 0
    for fate, share in (
        (FAIL, shares.fail),
        (ROLLBACK, shares.rollback),
        (REGRESS, shares.regress),
        (INCOMPATIBLE, shares.incompatible),
    ):
        count = round(share * len(ids))
        for device in ranked[start : start + count]:
            fates[device] = fate
        start += count
    return fates


def offline_devices(seed: int, ids: Sequence[str], share: float) -> frozenset[str]:
    """The ``round(share * N)`` devices that drop off the broker after start."""
    return frozenset(_ranked(seed, "offline", ids)[: round(share * len(ids))])


def hardware_of(seed: int, device_id: str, mix: Sequence[tuple[str, float]]) -> tuple[str, ...]:
    """The device's hardware tags, drawn from the weighted mix by its hash."""
    total = sum(weight for _, weight in mix)
    point, upto = unit(seed, "hardware", device_id) * total, 0.0
    for entry, weight in mix:
        upto += weight
        if point < upto:
            return hardware_tags(entry)
    return hardware_tags(mix[-1][0])
