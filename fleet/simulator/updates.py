"""Update instructions as a simulated device sees them: the same signature, device and
replay checks as the agent (model_packs.instructions, one ledger per operator key, kept in
memory), the same field checks, and the event sequence a real install would publish.

Pure apart from the ledger: no broker, no clock. The device plays the planned steps out with
a delay between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleet.simulator.fates import FAIL, INCOMPATIBLE, ROLLBACK
from model_packs import instructions, layout
from model_packs.versions import parse_version


class Refusal(Exception):
    """An instruction the device does not act on; ``code`` is the agent's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def load_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """The operator public keys by key id (the agent's ``security.operator_keys``)."""
    keys = {}
    for path in paths:
        public = instructions.load_public_key(Path(path))
        keys[instructions.key_id(public)] = public
    return keys


class Gate:
    """Signature, device and replay checks; the ledger (highest seq per key) lives in memory,
    since a simulated device never restarts."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], device_id: str) -> None:
        self.keys, self.device_id = keys, device_id
        self.ledger: dict[str, int] = {}

    def check(self, data: Mapping[str, Any], action: str = "update") -> instructions.Instruction:
        if not self.keys:
            raise Refusal("forbidden", f"{action} needs a signed instruction and this device trusts no key")
        try:
            ins = instructions.verify(data, self.keys, action, self.device_id)
        except instructions.InstructionRefused as exc:
            raise Refusal(exc.code, exc.message) from None
        last = self.ledger.get(ins.key_id)
        if last is not None and ins.seq <= last:
            why = f"instruction seq {ins.seq} is not above {last}, the last accepted from key {ins.key_id}"
            raise Refusal("replayed", why)
        self.ledger[ins.key_id] = ins.seq  # spent before acting, like the agent
        return ins


@dataclass(frozen=True)
class Order:
    """The signed fields of an update instruction the device acts on."""

    id: str
    rollout_id: str
    target: str
    name: str
    version: str


def parse_order(body: Mapping[str, Any]) -> Order:
    """The agent's checks, in its order: ``v`` and the fields (``bad_request``), then the
    target's syntax (``update_rejected``)."""
    if body.get("v") != 1:
        raise Refusal("bad_request", f"v must be 1, got {body.get('v')!r}")
    fields = {k: body.get(k) for k in ("id", "rollout_id", "target")}
    bad = [k for k, v in fields.items() if not isinstance(v, str) or not v or len(v) > 128]
    if bad:
        raise Refusal("bad_request", f"update needs string fields {', '.join(bad)}")
    try:
        target = layout.parse_target(str(fields["target"]))
    except layout.TargetError as exc:
        raise Refusal("update_rejected", str(exc)) from None
    rid, rollout, name = str(fields["id"]), str(fields["rollout_id"]), str(fields["target"])
    return Order(rid, rollout, name, target.name, target.version)


@dataclass(frozen=True)
class Step:
    """One update event to publish (docs/protocol.md, update events)."""

    state: str
    percent: float | None = None
    reason_code: str | None = None
    reason: str | None = None


def _downloads(steps: int) -> list[Step]:
    return [Step("downloading", round(100.0 * i / steps, 1) if steps else 100.0) for i in range(steps + 1)]


def plan(
    fate: str,
    order: Order,
    current_version: str | None,
    hardware: tuple[str, ...],
    download_steps: int,
    rollback_targets: Iterable[str] = (),
) -> list[Step]:
    """The events of one install, by the device's fate. The last step says the outcome:
    ``activated`` (the status document then names the new pack), ``rolled_back`` or ``rejected``."""
    if fate == INCOMPATIBLE:
        why = f"pack is for ['{order.name}-other-hardware'], this device is {list(hardware)} (simulated)"
        return [Step("rejected", None, "incompatible", why)]
    signed_rollback = order.target in set(rollback_targets)
    if current_version is not None and not signed_rollback and _not_above(order.version, current_version):
        why = f"{order.version} is not above the active {current_version}: versions only go up"
        return [Step("rejected", None, "downgrade", why)]
    steps = [*_downloads(download_steps), Step("verifying"), Step("staged")]
    if fate == FAIL:
        why = "golden prompt 1 reproduced 0.41 < min_match 0.9 (simulated)"
        return [*steps, Step("rejected", None, "health_gate", why)]
    steps.append(Step("activated"))
    if fate == ROLLBACK:
        steps.append(Step("rolled_back", None, "health_probe", "first health probe failed (simulated)"))
    return steps


def _not_above(new: str, current: str) -> bool:
    """The agent's rule: versions only go up (SemVer precedence, build metadata ignored)."""
    return parse_version(new) <= parse_version(current)
