"""The serving side of pack updates: which slot to serve at boot, the first health probe
after a switch, automatic rollback, and rollout instructions arriving over MQTT."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent import __version__
from agent.errors import AgentError, BadRequest, Forbidden
from agent.packs.store import PackStore
from agent.packs.updater import HealthBudget, PackUpdater, UpdateEvent, provision_trust
from agent.packs.verify import UpdateRejected, golden_agreement, parse_target
from model_packs.format import default_pack_path, verify_pack

if TYPE_CHECKING:
    from agent.app import Agent
    from agent.inference import Engine

log = structlog.get_logger("edge_agent.update")
CRASH_LOOP_BOOTS = 3


def seed_if_empty(store: PackStore, pack_path: str | None) -> None:
    """An empty state directory is seeded from the configured (or default) pack, verified."""
    if store.active_path() is not None:
        return
    source = Path(pack_path) if pack_path else default_pack_path()
    manifest = verify_pack(source)
    store.seed(source, f"{manifest.name}@{manifest.version}")
    log.info("store_seeded", pack=str(source), version=manifest.version)


def probe(engine: Engine) -> str | None:
    """First health probe of a freshly activated pack: its first golden prompt must
    reproduce; returns the failure, or None when healthy."""
    from agent.inference import GenerationRequest

    golden = engine.pack.manifest.golden
    if not golden:
        return None
    g = golden[0]
    done = engine.generate(GenerationRequest(engine.prompt_ids(g.prompt), len(g.token_ids)))
    score = golden_agreement(done.token_ids, g.token_ids)
    return None if score >= g.min_match else f"golden prompt reproduced {score:.2f} < {g.min_match}"


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
    """Runs one install at a time in the background and reports on ``update/status``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._busy = threading.Lock()
        self._seq = 0

    def updater(self, repository_url: str, on_event: Callable[[UpdateEvent], None]) -> PackUpdater:
        cfg = self.agent.cfg
        tuf_dir = Path(cfg.state_dir) / "tuf"
        if cfg.updates.trusted_root:
            provision_trust(tuf_dir, Path(cfg.updates.trusted_root))
        return PackUpdater(
            self.agent.store,
            tuf_dir,
            repository_url,
            __version__,
            cfg.updates.hardware,
            on_event,
            HealthBudget(latency_factor=cfg.updates.latency_factor),
            room=self.agent.shadow_room,
        )

    def handle(self, data: dict[str, Any], client: str) -> str:
        if client not in self.agent.cfg.privileged_clients:
            raise Forbidden(f"updates are privileged; client {client!r} is not in privileged_clients")
        inst = parse_instruction(data)
        url = self.agent.cfg.updates.repository_url
        if not url:
            raise BadRequest("this agent has no updates.repository_url configured")
        if not self._busy.acquire(blocking=False):
            self._publish(
                inst,
                UpdateEvent(
                    "rejected", inst.target, reason_code="busy", reason="another update is in progress"
                ),
            )
            return "busy"
        threading.Thread(target=self._run, args=(inst, url), name="update", daemon=True).start()
        return "started"

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
        self.agent.transport.publish(self.agent.cfg.topic("update/status"), json.dumps(body).encode())

    def _run(self, inst: Instruction, url: str) -> None:
        try:
            self.agent.set_state("updating")
            self.updater(url, lambda e: self._publish(inst, e)).install(inst.target)
            failure = self.agent.serve_active_slot()
            if failure:
                self._publish(
                    inst, UpdateEvent("rolled_back", inst.target, reason_code="health_probe", reason=failure)
                )
        except UpdateRejected:
            pass  # already reported as "rejected"
        except (AgentError, OSError) as exc:
            self._publish(inst, UpdateEvent("rejected", inst.target, reason_code="internal", reason=str(exc)))
        finally:
            self.agent.set_state("online")
            self._busy.release()
