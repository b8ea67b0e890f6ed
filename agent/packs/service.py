"""Rollout instructions over MQTT: one install at a time, in the background, reported on
``update/status``. It decides nothing about the served pack: :class:`ActivePack` gates,
adopts or rolls back; the :class:`PackUpdater` verifies, fetches and switches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.config import UpdatesConfig
from agent.errors import AgentError, BadRequest
from agent.packs.active import ActivePack
from agent.packs.decide import parse_target
from agent.packs.fetch import PackFetcher
from agent.packs.updater import PackUpdater, UpdateEvent, provision_trust
from agent.packs.verify import UpdateRejected

log = structlog.get_logger("edge_agent.update")


@dataclass(frozen=True)
class Instruction:
    id: str
    rollout_id: str
    target: str


def parse_instruction(data: dict[str, Any]) -> Instruction:
    if data.get("v") != 1:
        raise BadRequest(f"v must be 1, got {data.get('v')!r}")
    fields = {k: data.get(k) for k in ("id", "rollout_id", "target")}
    bad = [k for k, v in fields.items() if not isinstance(v, str) or not v or len(v) > 128]
    if bad:
        raise BadRequest(f"update needs string fields {', '.join(bad)}")
    parse_target(str(fields["target"]))
    return Instruction(str(fields["id"]), str(fields["rollout_id"]), str(fields["target"]))


class UpdateService:
    """``handle`` validates and starts an install thread; events go out through ``publish``
    (bytes for the ``update/status`` topic)."""

    def __init__(
        self,
        active: ActivePack,
        updates: Callable[[], UpdatesConfig],
        tuf_dir: Path,
        publish: Callable[[dict[str, Any]], None],
        fetcher: PackFetcher | None = None,
    ) -> None:
        self.active = active
        self._updates = updates
        self.tuf_dir = tuf_dir
        self._publish_event = publish
        self._fetcher = fetcher
        self._busy = threading.Lock()
        self._seq = 0
        self._thread: threading.Thread | None = None

    def updater(self, on_event: Callable[[UpdateEvent], None]) -> PackUpdater:
        cfg = self._updates()
        if cfg.trusted_root:
            provision_trust(self.tuf_dir, Path(cfg.trusted_root))
        return PackUpdater(
            self.active.store,
            self.tuf_dir,
            cfg.repository_url or "",
            __version__,
            self.active.gate,
            hardware=cfg.hardware,
            variants=cfg.variants,
            on_event=on_event,
            fetcher=self._fetcher,
        )

    def handle(self, data: dict[str, Any]) -> str:
        """Start the install an instruction names; returns ``started`` or ``busy``."""
        inst = parse_instruction(data)
        if not self._updates().repository_url:
            raise BadRequest("this agent has no updates.repository_url configured")
        if not self._busy.acquire(blocking=False):
            self._publish(
                inst,
                UpdateEvent(
                    "rejected", inst.target, reason_code="busy", reason="another update is in progress"
                ),
            )
            return "busy"
        self._thread = threading.Thread(target=self._run, args=(inst,), name="update", daemon=True)
        self._thread.start()
        return "started"

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the install in progress (tests, shutdown)."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _publish(self, inst: Instruction, e: UpdateEvent) -> None:
        self._seq += 1
        body = {
            "v": 1,
            "rollout_id": inst.rollout_id,
            "target": e.target,
            "seq": self._seq,
            "state": e.state,
            "percent": e.percent,
            "reason_code": e.reason_code,
            "reason": e.reason,
            "ts": time.time(),
        }
        self._publish_event(body)

    def _run(self, inst: Instruction) -> None:
        try:
            with self.active.updating():
                slot = self.updater(lambda e: self._publish(inst, e)).install(inst.target)
                failure = self.active.promote(slot)
            if failure:
                self._publish(
                    inst, UpdateEvent("rolled_back", inst.target, reason_code="health_probe", reason=failure)
                )
        except UpdateRejected:
            pass  # already reported as "rejected"
        except (AgentError, OSError) as exc:
            self._publish(inst, UpdateEvent("rejected", inst.target, reason_code="internal", reason=str(exc)))
        except Exception as exc:  # a bug must still reach the fleet, never kill silently
            log.exception("update_failed", target=inst.target)
            self._publish(
                inst, UpdateEvent("rejected", inst.target, reason_code="internal", reason=repr(exc))
            )
        finally:
            self._busy.release()
