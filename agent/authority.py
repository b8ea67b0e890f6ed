"""Who may update or reload this device: operators whose keys it was provisioned with.

Checking (:func:`model_packs.instructions.verify`: signature, action, device) is apart from the
one piece of state, the replay ledger: the highest ``seq`` accepted from each operator key,
kept on disk so a captured instruction stays spent across restarts. The ledger is written
(and fsynced) before the action runs: an instruction that crashed the agent mid-way is not
run again by a replay of it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import AgentError, ConfigError, Forbidden, Replayed, Unauthorized, WrongDevice
from model_packs.fileio import atomic_write_bytes
from model_packs.instructions import Instruction, InstructionRefused, key_id, load_public_key, verify

log = structlog.get_logger("edge_agent.authority")
_ERRORS: dict[str, type[AgentError]] = {"unauthorized": Unauthorized, "wrong_device": WrongDevice}


def load_operator_keys(paths: tuple[str, ...]) -> dict[str, Ed25519PublicKey]:
    """The configured operator public keys by key id; a bad file is ``bad_config`` at start."""
    keys = {}
    for p in paths:
        try:
            public = load_public_key(Path(p))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"security.operator_keys: {p}: {exc}") from None
        keys[key_id(public)] = public
    return keys


class ReplayLedger:
    """The highest accepted ``seq`` per operator key id, in one small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._last: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # a damaged ledger must not reopen every old instruction: refuse until repaired
            raise ConfigError(
                f"{self.path} is unreadable ({exc}); restore it or remove it knowingly"
            ) from None
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}

    def last(self, kid: str) -> int | None:
        return self._last.get(kid)

    def accept(self, ins: Instruction) -> None:
        """Record ``ins`` as spent, or raise ``replayed`` when it is not newer than the last."""
        with self._lock:
            last = self._last.get(ins.key_id)
            if last is not None and ins.seq <= last:
                raise Replayed(
                    f"instruction seq {ins.seq} is not above {last}, the last accepted from key {ins.key_id}"
                )
            self._last[ins.key_id] = ins.seq
            atomic_write_bytes(self.path, json.dumps(self._last, sort_keys=True).encode())


class Authority:
    """The one gate for privileged actions (updates, reload) arriving over MQTT."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], device_id: str, ledger: ReplayLedger) -> None:
        self.keys, self.device_id, self.ledger = dict(keys), device_id, ledger

    def check(self, data: Mapping[str, Any], action: str) -> Instruction:
        """The verified instruction (its signed fields are the only ones to act on), or an
        error with its own code: forbidden, unauthorized, wrong_device, replayed."""
        if not self.keys:
            raise Forbidden(
                f"{action} over MQTT needs instructions signed by an operator key, and this device "
                "trusts none (security.operator_keys); locally: systemctl reload edge-agent"
            )
        try:
            ins = verify(data, self.keys, action, self.device_id)
        except InstructionRefused as exc:
            raise _ERRORS.get(exc.code, Unauthorized)(exc.message) from None
        self.ledger.accept(ins)
        log.info("instruction_accepted", action=action, key=ins.key_id, seq=ins.seq)
        return ins
