"""Which device goes in which wave: pure and deterministic.

Canaries first (wave 0). The others are ordered by a hash of (rollout id, device id), so a
wave is a spread of the fleet rather than the devices whose names sort first (which often
share a site or a batch), and the order is the same for whoever computes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from fleet.rollouts.errors import RolloutError
from fleet.rollouts.spec import RolloutSpec


def assign_waves(
    rollout_id: str, spec: RolloutSpec, selected: Sequence[str], known: set[str]
) -> list[list[str]]:
    """Waves of device ids. ``selected``: what the selector picks; ``known``: every device in
    the registry (a canary must be one of them, selected or not)."""
    unknown = [c for c in spec.canary if c not in known]
    if unknown:
        raise RolloutError("unknown_device", f"canary devices not in the registry: {', '.join(unknown[:10])}")
    canary = set(spec.canary)
    rest = sorted((d for d in set(selected) if d not in canary), key=lambda d: _spread(rollout_id, d))
    waves: list[list[str]] = [list(spec.canary)] if spec.canary else []
    done = 0
    for step in spec.waves:
        total = step.total(len(rest))
        if total > done:
            waves.append(rest[done:total])
            done = total
    if not waves:
        raise RolloutError("no_devices", "the selector picks no device and no canary is named")
    return waves


def _spread(rollout_id: str, device: str) -> str:
    return hashlib.sha256(f"{rollout_id}\0{device}".encode()).hexdigest()
