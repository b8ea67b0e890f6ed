"""Home Assistant MQTT discovery: the agent as a device, its state as entities, and questions
from a dashboard answered through the normal answering path.

Two halves. The pure functions (:func:`discovery_documents`, :func:`state_document`,
:func:`question_request`, ...) build every document from the config and take no IO, so a test
can hold each one against Home Assistant's documented keys. :class:`Bridge` does the
publishing: the discovery entries (retained, as Home Assistant's docs allow, and again when
Home Assistant announces itself on ``{prefix}/status``), a small retained state document, and
the questions typed into the text entity.

What Home Assistant reads, all published by the agent:

- ``{root}/status`` (the retained status document and last will, docs/protocol.md): the
  device's availability, its status and the pack version;
- ``{root}/ha/state`` (retained): queue depth and the last answer's decode rate;
- ``{root}/ha/answer``: the reply (final or error, the protocol's JSON) to each question asked
  on ``{root}/ha/ask``.

A question from Home Assistant is a query like any other: the same size, rate, queue and
deadline limits under one client key (``homeassistant``), the same answering worker, grounding
and checks. Like every query it needs no operator key; unlike one, its answer goes to the one
fixed answer topic, never to a topic the asker names. Whoever may publish on the ask topic may
ask, and whoever may read the answer topic reads every answer: restrict both with broker ACLs
(docs/homeassistant.md).

The config topics published are remembered in ``state_dir/homeassistant.json``; at each
connect those no longer wanted (section removed or disabled, prefix or node id changed) get an
empty retained payload, which is how Home Assistant removes a discovered entity.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.config import AgentConfig, Limits
from agent.errors import AgentError, BadRequest, TooLarge
from agent.homeassistant_config import MAX_TEXT_CHARS, HomeAssistantSettings, default_node_id
from agent.messages import ReplyTo, encode, error_reply, parse_query
from agent.scheduling import Job, RateLimiter, Scheduler
from agent.telemetry.metrics import Answered
from agent.transport import Inbound
from model_packs.fileio import atomic_write_bytes

log = structlog.get_logger("edge_agent.homeassistant")

CLIENT = "homeassistant"  # the client key of questions asked from Home Assistant
ORIGIN = "edge-slm-agent"
AVAILABLE_STATES = ("online", "updating", "paused")  # serving: the entities are available
STATES = (*AVAILABLE_STATES, "offline")
PUBLISH_WAIT_S = 5.0  # a discovery publish the broker did not acknowledge by then: tried again
RETRY_S = (5.0, 300.0)  # the pause after a failed turn, doubling to the most (an ACL that refuses)

# Templates Home Assistant renders (Jinja, ``value_json`` = the payload's JSON); only plain
# Jinja, so the test renders them as Home Assistant would.
AVAILABILITY_TEMPLATE = (
    "{{ 'online' if value_json.state in ['online', 'updating', 'paused'] else 'offline' }}"
)
STATUS_TEMPLATE = "{{ value_json.state }}"
PACK_TEMPLATE = "{{ value_json.pack.version if value_json.pack else 'none' }}"
# '' leaves a numeric sensor as it was (unknown before the first answer)
TOKENS_TEMPLATE = "{{ value_json.tokens_per_s if value_json.tokens_per_s is not none else '' }}"
QUEUE_TEMPLATE = "{{ value_json.queue_depth }}"
ANSWER_TEMPLATE = (
    "{% if value_json.type == 'final' %}{{ value_json.text[:" + str(MAX_TEXT_CHARS) + "] }}"
    "{% else %}{{ ('[' ~ value_json.code ~ '] ' ~ value_json.message)[:" + str(MAX_TEXT_CHARS) + "] }}"
    "{% endif %}"
)
ANSWER_ATTRIBUTES_TEMPLATE = (
    "{{ {'id': value_json.id, 'type': value_json.type, 'source': value_json.get('source'), "
    "'code': value_json.get('code'), 'facts': value_json.get('facts', [])} | tojson }}"
)


@dataclass(frozen=True)
class Topics:
    """The agent-side topics Home Assistant reads or writes."""

    status: str  # the status document and last will
    state: str  # retained: queue depth, tokens/s
    ask: str  # Home Assistant -> agent: a question (the text entity's command topic)
    answer: str  # agent -> Home Assistant: the reply to each question
    birth: str  # Home Assistant's own status ("online" when it (re)starts)


def topics(cfg: AgentConfig, settings: HomeAssistantSettings) -> Topics:
    return Topics(
        cfg.topic("status"),
        cfg.topic("ha/state"),
        cfg.topic("ha/ask"),
        cfg.topic("ha/answer"),
        f"{settings.discovery_prefix}/status",
    )


def node_id(cfg: AgentConfig, settings: HomeAssistantSettings) -> str:
    return settings.node_id or default_node_id(cfg.device_id)


def config_topic(settings: HomeAssistantSettings, component: str, node: str, object_id: str) -> str:
    """``<discovery_prefix>/<component>/<node_id>/<object_id>/config``, Home Assistant's form."""
    return f"{settings.discovery_prefix}/{component}/{node}/{object_id}/config"


def device_block(cfg: AgentConfig, version: str) -> dict[str, Any]:
    """The device every entity belongs to: one per agent, named by its device id."""
    return {
        "identifiers": [f"edge-slm-agent_{cfg.device_id}"],
        "name": cfg.device_id,
        "manufacturer": "edge-slm-agent",
        "model": "edge-slm-agent",
        "sw_version": version,
    }


def _entity(cfg: AgentConfig, node: str, object_id: str, name: str, version: str) -> dict[str, Any]:
    return {
        "name": name,
        "unique_id": f"edge_slm_{node}_{object_id}",
        "device": device_block(cfg, version),
        "origin": {"name": ORIGIN, "sw_version": version},
        "qos": 1,
    }


def _available(t: Topics) -> dict[str, Any]:
    """Available while the status document says the agent serves (its last will says offline)."""
    return {
        "availability_topic": t.status,
        "availability_template": AVAILABILITY_TEMPLATE,
        "payload_available": "online",
        "payload_not_available": "offline",
    }


def discovery_documents(
    cfg: AgentConfig, settings: HomeAssistantSettings, version: str
) -> dict[str, dict[str, Any]]:
    """Config topic -> discovery document, for every entity this config asks for (none when
    the section is disabled)."""
    if not settings.enabled:
        return {}
    t, node = topics(cfg, settings), node_id(cfg, settings)

    def entity(component: str, object_id: str, name: str, **keys: Any) -> tuple[str, dict[str, Any]]:
        return config_topic(settings, component, node, object_id), {
            **_entity(cfg, node, object_id, name, version),
            **keys,
        }

    docs = [
        # no availability: "offline" is what this one is for
        entity(
            "sensor",
            "status",
            "Status",
            state_topic=t.status,
            value_template=STATUS_TEMPLATE,
            device_class="enum",
            options=list(STATES),
            icon="mdi:robot",
        ),
        entity(
            "sensor",
            "pack_version",
            "Pack version",
            state_topic=t.status,
            value_template=PACK_TEMPLATE,
            entity_category="diagnostic",
            icon="mdi:package-variant",
            **_available(t),
        ),
        entity(
            "sensor",
            "tokens_per_s",
            "Tokens per second",
            state_topic=t.state,
            value_template=TOKENS_TEMPLATE,
            unit_of_measurement="tokens/s",
            state_class="measurement",
            suggested_display_precision=1,
            icon="mdi:speedometer",
            **_available(t),
        ),
        entity(
            "sensor",
            "queue_depth",
            "Queue depth",
            state_topic=t.state,
            value_template=QUEUE_TEMPLATE,
            state_class="measurement",
            icon="mdi:tray-full",
            **_available(t),
        ),
        entity(
            "sensor",
            "answer",
            "Answer",
            state_topic=t.answer,
            value_template=ANSWER_TEMPLATE,
            json_attributes_topic=t.answer,
            json_attributes_template=ANSWER_ATTRIBUTES_TEMPLATE,
            icon="mdi:message-reply-text",
            **_available(t),
        ),
    ]
    if settings.questions:
        docs.append(
            entity(
                "text",
                "question",
                "Question",
                command_topic=t.ask,
                min=1,
                max=min(MAX_TEXT_CHARS, cfg.limits.max_question_chars),
                mode="text",
                retain=False,
                **_available(t),
            )
        )
    return dict(docs)


def state_document(queue_depth: int, tokens_per_s: float | None, answers: int) -> dict[str, Any]:
    """``{root}/ha/state``: what the sensors that are not in the status document read.
    ``tokens_per_s`` is the decode rate of the last answer the model generated (``null``
    before the first); ``answers`` counts answers since the agent started."""
    rate = None if tokens_per_s is None else round(tokens_per_s, 1)
    return {"v": 1, "queue_depth": queue_depth, "tokens_per_s": rate, "answers": answers, "ts": time.time()}


def question_request(payload: bytes, limits: Limits, rid: str) -> dict[str, Any]:
    """A text entity's payload (the question as plain UTF-8) -> a query request, checked as
    the query topic checks its payload: size first, then the encoding. Not streamed: the
    answer sensor shows one final text."""
    if len(payload) > limits.max_payload_bytes:
        raise TooLarge(
            f"the question is {len(payload)} bytes; the limit is {limits.max_payload_bytes}",
            limit=limits.max_payload_bytes,
        )
    try:
        question = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the question is not UTF-8 text") from None
    return {"v": 1, "id": rid, "question": question.strip(), "stream": False}


# ---------------------------------------------------------------- publishing


@dataclass(frozen=True)
class Ports:
    """What the bridge asks of the rest of the agent, each as one function."""

    publish: Callable[[str, bytes, bool, float | None], None]  # topic, payload, retain, wait_s
    reply: Callable[[ReplyTo, dict[str, Any]], None]  # a reply, published like any other
    connected: Callable[[], bool]
    queue_depth: Callable[[], int]
    refused: Callable[[str, str], None]  # a message dropped: logged, counted
    counted: Callable[[str, str], None]  # telemetry: each request's kind and outcome


class Bridge:
    """Publishes the discovery entries and the state document, and takes the questions.

    The config is the one the agent started with (a change to the section needs a restart,
    as a reload reports); the limits are read per question, as the router reads them."""

    def __init__(
        self,
        cfg: AgentConfig,
        version: str,
        limits: Callable[[], Limits],
        limiter: RateLimiter,
        scheduler: Scheduler,
        ports: Ports,
    ) -> None:
        self.settings = cfg.homeassistant or HomeAssistantSettings(enabled=False)
        self.topics = topics(cfg, self.settings)
        self.documents = discovery_documents(cfg, self.settings, version)
        self.ledger = Path(cfg.state_dir) / "homeassistant.json"  # the retained topics published
        self._limits, self.limiter, self.scheduler, self.ports = limits, limiter, scheduler, ports
        self._wake = threading.Event()
        self._announce = threading.Event()  # discovery entries to (re)publish at the next turn
        self._lock = threading.Lock()
        self._tokens_per_s: float | None = None
        self._answers = 0

    @property
    def enabled(self) -> bool:
        return bool(self.documents)

    def subscriptions(self) -> list[str]:
        if not self.enabled:
            return []
        asks = [self.topics.ask] if self.settings.questions else []
        return [*asks, self.topics.birth]

    # ------------------------------------------------------------ inbound

    def handle(self, msg: Inbound) -> bool:
        """Takes the bridge's own topics; False: the message is the router's."""
        if not self.enabled:
            return False
        if msg.topic == self.topics.birth:
            if msg.payload.strip() == b"online":  # Home Assistant (re)started: announce again
                self.connected_again()
            return True
        if msg.topic == self.topics.ask and self.settings.questions:
            self._ask(msg)
            return True
        return False

    def _ask(self, msg: Inbound) -> None:
        """One question: the router's checks in the router's order (size, encoding, rate,
        fields, queue), then the answering worker's path; every refusal is an error reply on
        the answer topic, which the answer sensor shows."""
        if msg.retain:  # a retained question would be asked again on every reconnect
            self.ports.refused(msg.topic, "a question must not be retained")
            return
        started = time.monotonic()
        rid = f"ha-{uuid.uuid4().hex[:12]}"
        target = ReplyTo(self.topics.answer, None)
        limits = self._limits()
        try:
            data = question_request(msg.payload, limits, rid)
            self.limiter.take(f"query:{CLIENT}")  # the router's bucket for queries of this key
            q = parse_query(data, limits)
            self.scheduler.submit(Job(q, CLIENT, target, started, started + limits.deadline_s))
            outcome = "queued"
        except AgentError as err:
            self.ports.reply(target, error_reply(rid, 0, err))
            outcome = err.code
        self.ports.counted("query", outcome)
        log.info("ha_question", id=rid, outcome=outcome, bytes=len(msg.payload))
        self._wake.set()  # the queue depth changed

    def answered(self, a: Answered) -> None:
        """Any answered query: its decode rate (when the model ran) and the count."""
        with self._lock:
            self._answers += 1
            if a.tokens_per_s > 0:
                self._tokens_per_s = a.tokens_per_s
        self._wake.set()

    def connected_again(self) -> None:
        """On every connect (paho's thread: only flags it; the bridge's thread publishes)."""
        self._announce.set()
        self._wake.set()

    # ------------------------------------------------------------ outbound

    def needed(self) -> bool:
        """Something to publish, or old entries to clear (reads the ledger: not before start)."""
        return self.enabled or bool(self._remembered())

    def run(self, stopping: threading.Event) -> None:
        """Announce at each connect, then the state document when something changed and at
        least every ``state_interval_s``; a failed turn is tried again at the next."""
        if not self.needed():
            return
        due, failures = 0.0, 0
        while not stopping.is_set():
            woken = self._wake.wait(0.5)
            if not self.ports.connected():
                stopping.wait(0.5)  # the flags stay set: the turn runs once connected
                continue
            now = time.monotonic()
            if not woken and now < due:
                continue
            self._wake.clear()
            try:
                if self._announce.is_set():
                    self._announce.clear()
                    self.announce()
                if not self.enabled:
                    return  # the old entries are cleared: nothing more to do
                self.publish_state()
                due, failures = now + self.settings.state_interval_s, 0
            except Exception as exc:  # not acknowledged, refused, a disk error: again later
                self._announce.set()
                self._wake.set()
                pause = min(RETRY_S[0] * 2**failures, RETRY_S[1])
                failures = min(failures + 1, 8)
                log.warning("ha_publish_failed", reason=str(exc)[:200], retry_in_s=pause)
                stopping.wait(pause)

    def announce(self) -> None:
        """Clear the entries published before and no longer wanted, then publish the wanted
        ones, all retained. The ledger lists both until the clears are acknowledged, so an
        agent stopped half-way clears them at its next start."""
        wanted = dict(self.documents)
        keep = [*wanted, self.topics.state] if self.enabled else []
        before = self._remembered()
        stale = sorted(set(before) - set(keep))
        self._remember(sorted(set(before) | set(keep)))
        for topic in stale:
            self.ports.publish(topic, b"", True, PUBLISH_WAIT_S)
        for topic, doc in wanted.items():
            self.ports.publish(topic, json.dumps(doc, sort_keys=True).encode(), True, PUBLISH_WAIT_S)
        self._remember(keep)
        log.info("ha_discovery", published=len(wanted), cleared=len(stale))

    def publish_state(self) -> None:
        with self._lock:
            doc = state_document(self.ports.queue_depth(), self._tokens_per_s, self._answers)
        self.ports.publish(self.topics.state, encode(doc), True, None)

    def _remembered(self) -> list[str]:
        try:
            data = json.loads(self.ledger.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:  # unreadable: nothing to clear, say so once
            log.warning("ha_ledger_unreadable", path=str(self.ledger), reason=str(exc)[:200])
            return []
        topics_ = data.get("retained") if isinstance(data, dict) else None
        return [t for t in topics_ or [] if isinstance(t, str)]

    def _remember(self, retained: list[str]) -> None:
        atomic_write_bytes(self.ledger, json.dumps({"v": 1, "retained": retained}, indent=1).encode())
