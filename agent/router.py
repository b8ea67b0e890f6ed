"""Inbound message -> handler by topic; every failure becomes an error reply.

Reads and commands are answered here, at once (a read never waits behind the model);
queries are validated and queued for the engine worker. Nothing in a payload, and
nothing the model writes, chooses a handler other than by the topic it arrived on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from agent.errors import AgentError, BadRequest, Cancelled, Forbidden
from agent.messages import (
    PRIVILEGED,
    CmdRequest,
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
from agent.scheduling import Job
from agent.transport import Inbound

if TYPE_CHECKING:
    from agent.app import Agent

log = structlog.get_logger("edge_agent.router")


class Router:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.cfg
        self.kinds = {cfg.topic(k): k for k in ("query", "read", "cmd", "update")}
        self.fallback = cfg.topic("replies")

    def handle(self, msg: Inbound) -> None:
        if self.agent.hub.ingest(msg.topic, msg.payload):
            return
        kind = self.kinds.get(msg.topic)
        if kind is None:
            log.warning("unexpected_topic", topic=msg.topic)
            return
        started = time.monotonic()
        data: dict[str, Any] | None = None
        target = ReplyTo(msg.response_topic or self.fallback, msg.correlation_data)
        rid: str | None = None
        client = target.topic
        try:
            data = decode_json(msg.payload, self.agent.cfg.limits)
            rid = request_id(data)
            target, refused = reply_to(
                data, msg.response_topic, msg.correlation_data, self.fallback, tuple(self.kinds)
            )
            client = client_key(msg.user_properties, data, target)
            if refused is not None:
                raise refused
            if not (kind == "cmd" and data.get("cmd") == "cancel"):
                self.agent.limiter.take(client)
            outcome = self._dispatch(kind, data, target, client, started)
        except AgentError as err:
            self.agent.reply(target, error_reply(rid, 0, err))
            outcome = err.code
        except Exception as exc:  # a bug must still answer the request
            log.exception("handler_failed", kind=kind)
            self.agent.reply(target, error_reply(rid, 0, AgentError(f"internal error: {type(exc).__name__}")))
            outcome = "internal"
        log.info(
            "request",
            id=rid,
            client=client,
            kind=kind,
            outcome=outcome,
            ms=round((time.monotonic() - started) * 1000, 2),
        )

    def _dispatch(self, kind: str, data: dict[str, Any], target: ReplyTo, client: str, started: float) -> str:
        limits = self.agent.cfg.limits
        if kind == "query":
            q = parse_query(data, limits)
            job = Job(q, client, target, started, started + limits.deadline_s)
            self.agent.scheduler.submit(job)
            return "queued"
        if kind == "update":
            state = self.agent.updates.handle(data, client)
            self.agent.reply(target, final_reply(str(data.get("id")), 0, result={"update": state}))
            return state
        if kind == "read":
            r = parse_read(data)
            fact = self.agent.hub.read(r.sensor, r.agg, r.window_s)
            shown = "no reading" if fact.value is None else f"{fact.value:.6g}"
            stale = " (stale)" if fact.stale else ""
            text = (
                f"{fact.sensor} {fact.agg} over {fact.to_json()['window']}: {shown} {fact.unit}".rstrip()
                + stale
            )
            self.agent.reply(
                target,
                final_reply(
                    r.id,
                    0,
                    text=text,
                    value=fact.value,
                    facts=[fact.to_json()],
                    grounded=True,
                    ungrounded=[],
                    pack=self.agent.pack_info(),
                ),
            )
            return "ok"
        return self._command(parse_cmd(data), target, client)

    def _command(self, c: CmdRequest, target: ReplyTo, client: str) -> str:
        if c.cmd in PRIVILEGED and client not in self.agent.cfg.privileged_clients:
            raise Forbidden(f"{c.cmd} is privileged; client {client!r} is not in privileged_clients")
        if c.cmd == "ping":
            result: dict[str, Any] = {"pong": True, "ts": time.time()}
        elif c.cmd == "status":
            result = self.agent.status_report()
        elif c.cmd == "cancel":
            result = self._cancel(c)
        else:  # "reload": parse_cmd admits only COMMANDS
            result = self.agent.reload()
        self.agent.reply(target, final_reply(c.id, 0, result=result))
        return "ok"

    def _cancel(self, c: CmdRequest) -> dict[str, Any]:
        assert c.target_id is not None
        found = self.agent.scheduler.cancel(c.target_id)
        if found is None:
            raise BadRequest(f"no queued or running request with id {c.target_id!r}")
        state, job = found
        if state == "queued":
            err = Cancelled(f"request {job.id} was cancelled by {c.id} before it started")
            self.agent.reply(job.reply, error_reply(job.id, 0, err))
        return {"cancelled": c.target_id, "state": state}
