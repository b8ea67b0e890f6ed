"""Bytes <-> validated request and reply values (the wire contract: docs/protocol.md).

Parsing is pure: it never touches the broker, the engine or the clock. Each failure
raises an :class:`AgentError` whose code goes on the wire. The request ``id`` is read
first, so even a rejected request's error reply carries it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from agent.config import Limits, parse_duration
from agent.errors import AgentError, BadJson, BadRequest, TooLarge
from agent.sensors.windows import AGGREGATES
from model_packs.topics import topic_matches

SCHEMA_VERSION = 1
COMMANDS = ("ping", "status", "cancel", "reload")
Route = Literal["local", "auto", "remote"]  # agent.answers.routing.Route: who may answer a query
ROUTES: tuple[Route, ...] = ("local", "auto", "remote")
_NO_WILDCARDS = re.compile(r"^[^#+\x00]+$")


@dataclass(frozen=True)
class ReplyTo:
    """Where a reply goes: a topic, plus MQTT 5 correlation data to echo."""

    topic: str
    correlation_data: bytes | None


@dataclass(frozen=True)
class QueryRequest:
    id: str
    question: str
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    route: Route = "auto"  # local: never escalate; remote: escalate first (when configured)


@dataclass(frozen=True)
class ReadRequest:
    id: str
    sensor: str
    window_s: float | None
    agg: str


@dataclass(frozen=True)
class CmdRequest:
    id: str
    cmd: str
    target_id: str | None


Request = QueryRequest | ReadRequest | CmdRequest


def decode_json(payload: bytes, limits: Limits) -> dict[str, Any]:
    if len(payload) > limits.max_payload_bytes:
        raise TooLarge(
            f"payload is {len(payload)} bytes; the limit is {limits.max_payload_bytes}",
            limit=limits.max_payload_bytes,
        )
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, int over 4300 digits
        raise BadJson(f"payload is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise BadJson("payload nests too deeply") from None
    if not isinstance(data, dict):
        raise BadJson("payload must be a JSON object")
    return data


def request_id(data: dict[str, Any]) -> str | None:
    """The id if it is usable, else None (the error reply then says why)."""
    rid = data.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 else None


def _opt(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"{key} must be a number, got a boolean")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequest(f"{key} must be {name}, got {type(value).__name__}")
    return value


def _common(data: dict[str, Any]) -> str:
    if data.get("v") != SCHEMA_VERSION:
        raise BadRequest(f"v must be {SCHEMA_VERSION}, got {data.get('v')!r}")
    rid = request_id(data)
    if rid is None:
        raise BadRequest("id must be a string of 1-64 characters")
    return rid


def parse_query(data: dict[str, Any], limits: Limits) -> QueryRequest:
    rid = _common(data)
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("question must be a non-empty string")
    if len(question) > limits.max_question_chars:
        raise TooLarge(
            f"question is {len(question)} characters; the limit is {limits.max_question_chars}",
            limit=limits.max_question_chars,
        )
    max_tokens = _opt(data, "max_tokens", int)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise TooLarge(
            f"max_tokens {max_tokens} is over this device's cap of {limits.max_tokens}",
            limit=limits.max_tokens,
        )
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("max_tokens must be >= 1")
    stop = data.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and 0 < len(s) <= 32 for s in stop)
    ):
        raise BadRequest("stop must be a string or a list of at most 4 strings of 1-32 characters")
    stream = data.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    route = data.get("route")
    if route is None:
        route = "auto"
    if route not in ROUTES:
        raise BadRequest(f"route must be one of {', '.join(ROUTES)}, got {str(route)[:40]!r}")
    temperature, top_p = _opt(data, "temperature", (int, float)), _opt(data, "top_p", (int, float))
    return QueryRequest(
        id=rid,
        question=question,
        max_tokens=max_tokens,
        temperature=_float("temperature", temperature),
        top_p=_float("top_p", top_p),
        top_k=_opt(data, "top_k", int),
        seed=_opt(data, "seed", int),
        stop=tuple(stop),
        stream=stream,
        route=route,
    )


def _float(key: str, value: int | float | None) -> float | None:
    try:
        return None if value is None else float(value)
    except OverflowError:  # a JSON integer too large for a float
        raise BadRequest(f"{key} is out of range") from None


def parse_read(data: dict[str, Any]) -> ReadRequest:
    rid = _common(data)
    sensor = data.get("sensor")
    if not isinstance(sensor, str) or not sensor:
        raise BadRequest("sensor must be a non-empty string")
    agg = data.get("agg", "last")
    if agg not in AGGREGATES:
        raise BadRequest(f"agg must be one of {', '.join(AGGREGATES)}, got {agg!r}")
    window = data.get("window")
    try:
        window_s = None if window is None else parse_duration(window)
    except ValueError as exc:
        raise BadRequest(f"window: {exc}") from None
    if window_s is not None and window_s <= 0:
        raise BadRequest("window must be positive")
    return ReadRequest(rid, sensor, window_s, agg)


def parse_cmd(data: dict[str, Any]) -> CmdRequest:
    rid = _common(data)
    cmd = data.get("cmd")
    if cmd not in COMMANDS:
        raise BadRequest(f"cmd must be one of {', '.join(COMMANDS)}, got {cmd!r}")
    target = data.get("target_id")
    if cmd == "cancel" and not (isinstance(target, str) and target):
        raise BadRequest("cancel needs target_id, the id of the request to cancel")
    return CmdRequest(rid, cmd, target if isinstance(target, str) else None)


@dataclass(frozen=True)
class ReplyPolicy:
    """Where a requester may have its replies published: a topic matching ``allowed``,
    outside every device's tree (``device_trees``), never ``$``, wildcards or non-UTF-8."""

    allowed: tuple[str, ...]
    device_trees: tuple[str, ...]  # e.g. "edge/+/#" from the topic root template

    def refusal(self, topic: object) -> str | None:
        """Why ``topic`` may not be used, or None when it may."""
        if not isinstance(topic, str) or not topic or len(topic) > 256:
            return "not a topic of 1-256 characters"
        if not _utf8(topic) or not _NO_WILDCARDS.match(topic) or topic.startswith("$"):
            return "wildcards, '$' topics and non-UTF-8 names are never reply topics"
        if any(topic_matches(t, topic) for t in self.device_trees):
            return "inside a device's topic tree"
        if not any(topic_matches(a, topic) for a in self.allowed):
            return f"not under replies.allowed_topics {list(self.allowed)}"
        return None


def reply_to(
    data: dict[str, Any] | None,
    response_topic: str | None,
    correlation: bytes | None,
    fallback: str,
    policy: ReplyPolicy,
) -> tuple[ReplyTo | None, str | None]:
    """MQTT 5 response topic, else payload ``reply_to``, else the device's own fallback topic.
    A requester's topic that the policy refuses gives ``(None, reason)``: nothing may be
    published for that request, not even an error (there is nowhere safe to send it)."""
    topic = response_topic or (data.get("reply_to") if data else None)
    if topic is None:
        return ReplyTo(fallback, correlation), None
    why = policy.refusal(topic)
    if why is not None:
        return None, why
    return ReplyTo(topic, correlation), None


def _utf8(text: str) -> bool:
    """MQTT topics are UTF-8: a lone surrogate (valid in JSON, not in UTF-8) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def client_key(user_properties: dict[str, str], data: dict[str, Any] | None, reply: ReplyTo) -> str:
    """Fairness and rate-limit key: user property ``client``, payload ``client``, reply topic."""
    if user_properties.get("client"):
        return user_properties["client"][:64]
    if data and isinstance(data.get("client"), str) and data["client"]:
        return str(data["client"])[:64]
    return reply.topic


# ---------------------------------------------------------------- replies


def encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chunk_reply(rid: str, seq: int, delta: str) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "id": rid, "type": "chunk", "seq": seq, "delta": delta}


def error_reply(rid: str | None, seq: int, err: AgentError) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "id": rid,
        "type": "error",
        "seq": seq,
        "code": err.code,
        "message": err.message,
    }
    if err.limit is not None:
        out["limit"] = err.limit
    return out


def final_reply(rid: str, seq: int, **fields: Any) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "id": rid, "type": "final", "seq": seq, **fields}
