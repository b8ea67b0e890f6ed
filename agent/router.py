"""Inbound message -> handler by topic; every failure becomes an error reply.

Reads and commands are answered here, at once (a read never waits behind the model, and
a reload runs on its own thread); queries are validated and queued for the answering
worker. Nothing in a payload, and nothing the model writes, chooses a handler other than
by the topic it arrived on. The router holds no state of its own: it is handed the narrow
parts it uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.config import AgentConfig
from agent.errors import AgentError, BadRequest, Cancelled
from agent.messages import (
    CmdRequest,
    ReplyPolicy,
    ReplyTo,
    client_key,
    decode_json,
    error_reply,
    final_reply,
    parse_cmd,
    parse_query,
    parse_read,
    reply_to,
    request_id,
)
from agent.scheduling import Job, RateLimiter, Scheduler
from agent.sensors.hub import SensorHub
from agent.sensors.windows import read_text
from agent.transport import Inbound
from model_packs.instructions import Instruction

log = structlog.get_logger("edge_agent.router")
REQUEST_KINDS = ("query", "read", "cmd", "update")
Reply = Callable[[ReplyTo, dict[str, Any]], None]


@dataclass(frozen=True)
class Handlers:
    """What the router asks of the rest of the agent, each as one function."""

    reply: Reply  # publish a reply to its topic
    status: Callable[[str], dict[str, Any]]  # the `cmd status` document, as this client key sees it
    reload: Callable[[], dict[str, Any]]  # re-read config and pack (slow: runs off this thread)
    update: Callable[[dict[str, Any]], str]  # start an install from an instruction
    authorize: Callable[[dict[str, Any], str], Instruction]  # a signed instruction, or raises
    pack_info: Callable[[], dict[str, str] | None]
    refused: Callable[[str, str], None]  # a reply topic the policy refused: logged, counted
    counted: Callable[[str, str], None] = lambda kind, outcome: None  # telemetry: each request
    # the fleet's ack on {root}/telemetry/ack (raw payload): never a request; None: not subscribed
    telemetry_ack: Callable[[bytes], None] | None = None


def reply_policy(cfg: AgentConfig) -> ReplyPolicy:
    """Replies only under ``replies.allowed_topics`` and never into any device's tree."""
    root = cfg.mqtt.topic_root.replace("{device_id}", "+")
    return ReplyPolicy(cfg.replies.allowed_topics, (f"{root}/#",))


class Router:
    def __init__(
        self,
        settings: Callable[[], AgentConfig],
        hub: SensorHub,
        scheduler: Scheduler,
        limiter: RateLimiter,
        handlers: Handlers,
    ) -> None:
        cfg = settings()
        self._settings = settings
        self.hub, self.scheduler, self.limiter, self.h = hub, scheduler, limiter, handlers
        self.kinds = {cfg.topic(k): k for k in REQUEST_KINDS}
        self.fallback = cfg.topic("replies")
        self.ack_topic = cfg.topic("telemetry/ack")
        t = cfg.telemetry
        self._acks = handlers.telemetry_ack is not None and t.enabled and t.ack == "fleet"

    def subscriptions(self) -> list[str]:
        """The request topics, the sensors', and the fleet's telemetry ack when the spool
        waits for it (``telemetry.ack: fleet``)."""
        acks = [self.ack_topic] if self._acks else []
        return list(self.kinds) + acks + sorted(self.hub.topics)

    def handle(self, msg: Inbound) -> None:
        if msg.topic == self.ack_topic:  # first: retained on purpose, and never a request or a reading
            self._telemetry_ack(msg)
            return
        if self.hub.ingest(msg.topic, msg.payload):
            return
        kind = self.kinds.get(msg.topic)
        if kind is None:
            log.warning("unexpected_topic", topic=msg.topic[:200])
            return
        if msg.retain:  # a retained request would run again on every reconnect: never act on one
            self.h.refused(msg.topic, "a request must not be retained")
            return
        started, cfg = time.monotonic(), self._settings()
        policy = reply_policy(cfg)
        if msg.response_topic is not None and (why := policy.refusal(msg.response_topic)):
            self.h.refused(msg.response_topic, why)  # checked first: even a bad_json goes nowhere else
            return
        target = ReplyTo(msg.response_topic or self.fallback, msg.correlation_data)
        rid: str | None = None
        client = target.topic
        try:
            data = decode_json(msg.payload, cfg.limits)
            rid = request_id(data)
            resolved, why = reply_to(data, msg.response_topic, msg.correlation_data, self.fallback, policy)
            if resolved is None:
                self.h.refused(str(data.get("reply_to"))[:200], why or "refused")
                return
            target = resolved
            client = client_key(msg.user_properties, data, target)
            self.limiter.take(f"{'query' if kind == 'query' else 'other'}:{client}")  # own bucket per kind
            outcome = self._dispatch(kind, data, target, client, started)
        except AgentError as err:
            self.h.reply(target, error_reply(rid, 0, err))
            outcome = err.code
        except Exception as exc:  # a bug must still answer the request
            log.exception("handler_failed", kind=kind)
            self.h.reply(target, error_reply(rid, 0, AgentError(f"internal error: {type(exc).__name__}")))
            outcome = "internal"
        self.h.counted(kind, outcome)
        log.info(
            "request",
            id=rid,
            client=client,
            kind=kind,
            outcome=outcome,
            ms=round((time.monotonic() - started) * 1000, 2),
        )

    def _telemetry_ack(self, msg: Inbound) -> None:
        """Handed over as raw bytes (the telemetry service parses it strictly and counts what
        is wrong); a session subscribed under an older config may still deliver one: dropped."""
        if self.h.telemetry_ack is None or not self._acks:
            log.info("telemetry_ack_ignored", reason="not subscribed (telemetry.ack is not fleet)")
            return
        try:
            self.h.telemetry_ack(msg.payload)
        except Exception:  # the handler counts its refusals; a bug here must not stop the dispatcher
            log.exception("telemetry_ack_failed")

    def _dispatch(self, kind: str, data: dict[str, Any], target: ReplyTo, client: str, started: float) -> str:
        cfg = self._settings()
        if kind == "query":
            q = parse_query(data, cfg.limits)
            self.scheduler.submit(Job(q, client, target, started, started + cfg.limits.deadline_s))
            return "queued"
        if kind == "update":
            signed = self.h.authorize(data, "update").body  # act on the signed fields only
            state = self.h.update(dict(signed))
            self.h.reply(target, final_reply(str(data.get("id")), 0, result={"update": state}))
            return state
        if kind == "read":
            return self._read(data, target)
        return self._command(parse_cmd(data), data, target, client)

    def _read(self, data: dict[str, Any], target: ReplyTo) -> str:
        r = parse_read(data)
        fact = self.hub.read(r.sensor, r.agg, r.window_s)
        body = final_reply(
            r.id,
            0,
            text=read_text(fact.to_json()),  # the CLI's words: a trend per minute, no reading plainly
            value=fact.value,
            facts=[fact.to_json()],
            grounded=True,
            ungrounded=[],
            pack=self.h.pack_info(),
        )
        self.h.reply(target, body)
        return "ok"

    def _command(self, c: CmdRequest, data: dict[str, Any], target: ReplyTo, client: str) -> str:
        if c.cmd == "reload":
            self.h.authorize(data, "reload")
            threading.Thread(target=self._reload, args=(c, target), name="reload", daemon=True).start()
            return "reloading"
        if c.cmd == "ping":
            result: dict[str, Any] = {"pong": True, "ts": time.time()}
        elif c.cmd == "status":
            result = self.h.status(client)
        else:  # "cancel": parse_cmd admits only COMMANDS
            result = self._cancel(c, client)
        self.h.reply(target, final_reply(c.id, 0, result=result))
        return "ok"

    def _reload(self, c: CmdRequest, target: ReplyTo) -> None:
        """Off the dispatcher: reads and pings are answered while a new engine loads."""
        try:
            body = final_reply(c.id, 0, result=self.h.reload())
        except AgentError as err:
            body = error_reply(c.id, 0, err)
        except Exception as exc:  # a bug must still answer the request
            log.exception("reload_failed")
            body = error_reply(c.id, 0, AgentError(f"internal error: {type(exc).__name__}"))
        self.h.reply(target, body)
        log.info("request", id=c.id, kind="cmd", cmd="reload", outcome=body["type"])

    def _cancel(self, c: CmdRequest, client: str) -> dict[str, Any]:
        assert c.target_id is not None
        found = self.scheduler.cancel(c.target_id, client)
        if found is None:
            raise BadRequest(f"no queued or running request {c.target_id!r} of client {client!r}")
        state, job = found
        if state == "queued":
            err = Cancelled(f"request {job.id} was cancelled by {c.id} before it started")
            self.h.reply(job.reply, error_reply(job.id, 0, err))
        return {"cancelled": c.target_id, "state": state}
