"""Hybrid routing (issue 12): which model answers a request, as a pure function.

Local first. Escalate when the request asks for it (``route: remote``), when the question
matches no sensor and looks like it needs knowledge the small model lacks, when the local
answer failed validation, or when the local model was unsure (mean token log-probability
under ``RoutingPolicy.confidence_threshold``). Escalation happens only when it is configured,
its privacy rule lets out what the question needs, and there is time left for it.

:func:`decide` is called at each step of one request with what is known so far:

1. before generating (``local=None``): ``escalate_first`` or ``local``;
2. after an escalation that failed or whose answer failed validation (``tried_remote=True``,
   ``local=None``): ``local`` if there is time for it, else ``template``;
3. after the local answer (its validation outcome and confidence in ``local``, after the local
   retry): ``local`` (keep it), ``escalate_after_local`` or ``template``. When that
   escalation fails, keep the local answer if it passed validation, else the template.

A :class:`Routing` carries the ``decision``, the ``reason`` (what drove it) and, when an
escalation was wanted but not made, ``blocked`` (why not). ``code`` is the one short code for a
reply or a counter: ``blocked`` if set, else ``reason``.

    reason               meaning
    local_first          nothing asks for escalation yet: generate locally
    passed               the local answer passed validation and is confident: keep it
    requested            the request's route decided (remote: escalate first; local: never escalate)
    no_sensor_knowledge  no sensor matched and the question looks like it needs knowledge
    validation_failed    the local answer contradicts the facts (after its retry), or the local
                         model could not answer (its grounded prompt does not fit its context)
    low_confidence       the local answer passed validation, its mean log-probability is low
    escalation_failed    the escalation gave no usable answer: answer locally, or by template

    blocked              meaning
    disabled             no escalation configured, or its privacy is none
    privacy              privacy is facts and no sensor matched: nothing the upstream could use
    no_time              less time left than the step needs (min_remote_s; min_local_s after a
                         failed escalation)
    route_local          the request said route: local
    tried                an escalation was tried already for this request

The knowledge heuristic (:func:`needs_knowledge`) is deliberately simple: a question of at
least three words that is not small talk (greetings, thanks, "who/how are you", "what can you
do"). It matters only when no sensor matched, so a sensor question never escalates by it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Route = Literal["local", "auto", "remote"]
ROUTES: tuple[Route, ...] = ("local", "auto", "remote")
Escalation = Literal["off", "facts", "facts_and_question"]  # privacy "none" is "off"
Decision = Literal["local", "escalate_first", "escalate_after_local", "template"]
Reason = Literal[
    "local_first",
    "passed",
    "requested",
    "no_sensor_knowledge",
    "validation_failed",
    "low_confidence",
    "escalation_failed",
]
Blocked = Literal["disabled", "privacy", "no_time", "route_local", "tried"]


@dataclass(frozen=True)
class RoutingPolicy:
    """The configurable part. The threshold default comes from the default pack (SmolLM2-135M,
    greedy, grounded demo questions): its answers score -0.45 to -1.05, text sampled at
    temperature 1.5 scores -9; -1.2 flags only clearly unsure generations. The mean
    log-probability does not tell a wrong answer from a right one (wrong verdicts scored -0.6):
    validation is the gate that catches those."""

    confidence_threshold: float = -1.2  # mean log-probability (nats/token) under which: low confidence
    min_remote_s: float = 1.0  # less time left than this: no escalation
    min_local_s: float = 0.5  # after a failed escalation, less than this: template, not local


@dataclass(frozen=True)
class LocalOutcome:
    passed: bool  # the local answer passed validation (after its retry)
    mean_logprob: float | None  # Completion.usage.mean_logprob; None: unknown, not low


@dataclass(frozen=True)
class RoutingInput:
    route: Route = "auto"
    escalation: Escalation = "off"
    sensors_matched: int = 0
    needs_knowledge: bool = False  # needs_knowledge(question), or the picker's own judgement
    time_left_s: float = math.inf  # request deadline - time.monotonic()
    local: LocalOutcome | None = None  # None: no local answer yet
    tried_remote: bool = False  # an escalation was made for this request and gave nothing usable


@dataclass(frozen=True)
class Routing:
    decision: Decision
    reason: Reason
    blocked: Blocked | None = None

    @property
    def code(self) -> str:
        return self.blocked or self.reason


def _blocked(inp: RoutingInput, policy: RoutingPolicy) -> Blocked | None:
    """Why an escalation wanted now cannot be made, or None when it can."""
    if inp.route == "local":
        return "route_local"
    if inp.tried_remote:
        return "tried"
    if inp.escalation == "off":
        return "disabled"
    if inp.escalation == "facts" and inp.sensors_matched == 0:
        return "privacy"
    if inp.time_left_s < policy.min_remote_s:
        return "no_time"
    return None


def decide(inp: RoutingInput, policy: RoutingPolicy | None = None) -> Routing:
    """The next step for one request (see the module's tables)."""
    policy = policy or RoutingPolicy()
    local = inp.local
    if local is None:
        if inp.tried_remote:
            if inp.time_left_s < policy.min_local_s:
                return Routing("template", "escalation_failed", "no_time")
            return Routing("local", "escalation_failed")
        if inp.route == "local":
            return Routing("local", "requested")
        wanted: Reason | None = None
        if inp.route == "remote":
            wanted = "requested"
        elif inp.sensors_matched == 0 and inp.needs_knowledge:
            wanted = "no_sensor_knowledge"
        if wanted is None:
            return Routing("local", "local_first")
        blocked = _blocked(inp, policy)
        return Routing("local", wanted, blocked) if blocked else Routing("escalate_first", wanted)
    if not local.passed:
        blocked = _blocked(inp, policy)
        if blocked:
            return Routing("template", "validation_failed", blocked)
        return Routing("escalate_after_local", "validation_failed")
    if local.mean_logprob is None or local.mean_logprob >= policy.confidence_threshold:
        return Routing("local", "passed")
    blocked = _blocked(inp, policy)
    return (
        Routing("local", "low_confidence", blocked)
        if blocked
        else Routing("escalate_after_local", "low_confidence")
    )


_WORDS = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)?")  # words, "what's" as one
_SMALL_TALK_WORDS = frozenset(
    {
        *("hi", "hello", "hey", "hallo", "yo", "thanks", "thank", "you", "thx", "ok", "okay", "cool"),
        *("great", "nice", "bye", "goodbye", "good", "morning", "afternoon", "evening", "night"),
        *("cheers", "please", "yes", "no", "sure", "welcome", "very", "much", "so", "a", "lot", "there"),
    }
)
_SMALL_TALK = re.compile(
    r"^(who|what|how) (are|r) (you|u)\b|^what('?s| is) your name\b|^what can you do\b"
    r"|^are you (a |an )?(bot|robot|human|ai)\b"
)


def needs_knowledge(question: str) -> bool:
    """Whether a question (that matched no sensor) looks like it needs knowledge the small
    model lacks: at least three words, not made only of small-talk words, and not one of the
    small-talk phrases ("who are you", "how are you", "what can you do", ...)."""
    words = [w.lower() for w in _WORDS.findall(question)]
    if len(words) < 3 or set(words) <= _SMALL_TALK_WORDS:
        return False
    return not _SMALL_TALK.search(" ".join(words))
