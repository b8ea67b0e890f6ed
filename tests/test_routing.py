"""The routing policy as tables, the knowledge heuristic, and the engine's confidence
(mean log-probability of the sampled tokens) that feeds it."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import pytest

from agent.answers.routing import (
    LocalOutcome,
    Routing,
    RoutingInput,
    RoutingPolicy,
    decide,
    needs_knowledge,
)
from agent.inference import Engine, GenerationRequest
from agent.inference.sampling import SamplingParams

POLICY = RoutingPolicy(confidence_threshold=-1.2, min_remote_s=1.0, min_local_s=0.5)
OK = LocalOutcome(passed=True, mean_logprob=-0.5)
UNSURE = LocalOutcome(passed=True, mean_logprob=-2.0)
WRONG = LocalOutcome(passed=False, mean_logprob=-0.5)
FQ = "facts_and_question"

# (inputs, decision, reason, blocked)
BEFORE_LOCAL: list[tuple[dict[str, Any], str, str, str | None]] = [
    # auto: local first unless the question needs knowledge no sensor has
    (dict(escalation=FQ, sensors_matched=1), "local", "local_first", None),
    (dict(escalation=FQ, sensors_matched=1, needs_knowledge=True), "local", "local_first", None),
    (dict(escalation=FQ, sensors_matched=0, needs_knowledge=False), "local", "local_first", None),
    (
        dict(escalation=FQ, sensors_matched=0, needs_knowledge=True),
        "escalate_first",
        "no_sensor_knowledge",
        None,
    ),
    (dict(escalation="off", needs_knowledge=True), "local", "no_sensor_knowledge", "disabled"),
    (dict(escalation="facts", needs_knowledge=True), "local", "no_sensor_knowledge", "privacy"),
    (dict(escalation=FQ, needs_knowledge=True, time_left_s=0.9), "local", "no_sensor_knowledge", "no_time"),
    (
        dict(escalation=FQ, needs_knowledge=True, time_left_s=1.0),
        "escalate_first",
        "no_sensor_knowledge",
        None,
    ),
    # remote: escalate first when it can
    (dict(route="remote", escalation=FQ, sensors_matched=1), "escalate_first", "requested", None),
    (dict(route="remote", escalation="facts", sensors_matched=1), "escalate_first", "requested", None),
    (dict(route="remote", escalation="facts", sensors_matched=0), "local", "requested", "privacy"),
    (dict(route="remote", escalation="off", sensors_matched=1), "local", "requested", "disabled"),
    (dict(route="remote", escalation=FQ, time_left_s=0.2), "local", "requested", "no_time"),
    # local: never escalates
    (dict(route="local", escalation=FQ, needs_knowledge=True), "local", "requested", None),
    # after an escalation that gave nothing usable: local if there is time, else the template
    (dict(route="remote", escalation=FQ, tried_remote=True), "local", "escalation_failed", None),
    (dict(escalation=FQ, tried_remote=True, time_left_s=0.5), "local", "escalation_failed", None),
    (dict(escalation=FQ, tried_remote=True, time_left_s=0.4), "template", "escalation_failed", "no_time"),
]

AFTER_LOCAL: list[tuple[dict[str, Any], str, str, str | None]] = [
    # passed and confident: keep it, whatever else holds
    (dict(local=OK, escalation=FQ, sensors_matched=1), "local", "passed", None),
    (dict(local=OK, route="remote", escalation=FQ), "local", "passed", None),
    (dict(local=LocalOutcome(True, -1.2), escalation=FQ), "local", "passed", None),  # at the threshold
    (dict(local=LocalOutcome(True, None), escalation=FQ), "local", "passed", None),  # unknown is not low
    # passed but unsure: escalate when it can, else keep it
    (dict(local=UNSURE, escalation=FQ, sensors_matched=1), "escalate_after_local", "low_confidence", None),
    (
        dict(local=UNSURE, escalation="facts", sensors_matched=1),
        "escalate_after_local",
        "low_confidence",
        None,
    ),
    (dict(local=UNSURE, escalation="facts", sensors_matched=0), "local", "low_confidence", "privacy"),
    (dict(local=UNSURE, escalation="off"), "local", "low_confidence", "disabled"),
    (dict(local=UNSURE, escalation=FQ, time_left_s=0.3), "local", "low_confidence", "no_time"),
    (dict(local=UNSURE, escalation=FQ, route="local"), "local", "low_confidence", "route_local"),
    (dict(local=UNSURE, escalation=FQ, tried_remote=True), "local", "low_confidence", "tried"),
    # failed validation: escalate when it can, else the template
    (dict(local=WRONG, escalation=FQ, sensors_matched=2), "escalate_after_local", "validation_failed", None),
    (
        dict(local=WRONG, escalation="facts", sensors_matched=1),
        "escalate_after_local",
        "validation_failed",
        None,
    ),
    (dict(local=WRONG, escalation="facts", sensors_matched=0), "template", "validation_failed", "privacy"),
    (dict(local=WRONG, escalation="off", sensors_matched=1), "template", "validation_failed", "disabled"),
    (dict(local=WRONG, escalation=FQ, time_left_s=0.0), "template", "validation_failed", "no_time"),
    (dict(local=WRONG, escalation=FQ, route="local"), "template", "validation_failed", "route_local"),
    (dict(local=WRONG, escalation=FQ, tried_remote=True), "template", "validation_failed", "tried"),
]


@pytest.mark.parametrize(("given", "decision", "reason", "blocked"), BEFORE_LOCAL + AFTER_LOCAL)
def test_the_routing_table(given: dict[str, Any], decision: str, reason: str, blocked: str | None) -> None:
    got = decide(RoutingInput(**given), POLICY)
    assert got == Routing(decision, reason, blocked)  # type: ignore[arg-type]
    assert got.code == (blocked or reason)


def test_defaults_are_auto_without_escalation() -> None:
    assert decide(RoutingInput()) == Routing("local", "local_first")
    assert decide(RoutingInput(needs_knowledge=True)) == Routing("local", "no_sensor_knowledge", "disabled")


def test_the_threshold_comes_from_the_policy() -> None:
    inp = RoutingInput(escalation=FQ, sensors_matched=1, local=LocalOutcome(True, -0.8))
    assert decide(inp, RoutingPolicy(confidence_threshold=-1.0)).decision == "local"
    assert decide(inp, RoutingPolicy(confidence_threshold=-0.5)).decision == "escalate_after_local"


@pytest.mark.parametrize(
    ("question", "knowledge"),
    [
        ("What is the optimal pH for tomatoes?", True),
        ("Explain how a heat pump defrost cycle works.", True),
        ("What does NPK 10-10-10 mean?", True),
        ("Will it rain tomorrow in Lyon?", True),
        ("hello", False),
        ("Hi there!", False),
        ("thank you very much", False),
        ("thanks, what is a good VPD for lettuce?", True),
        ("Thanks, good morning!", False),
        ("Who are you?", False),
        ("how are you doing today", False),
        ("What's your name?", False),
        ("what can you do for me", False),
        ("Are you a robot?", False),
        ("status?", False),
        ("co2 now?", False),
        ("", False),
    ],
)
def test_the_knowledge_heuristic(question: str, knowledge: bool) -> None:
    assert needs_knowledge(question) is knowledge


# ---------------------------------------------------------------- the engine's confidence


def _prompt(engine: Engine) -> list[int]:
    return engine.prompt_ids("What is the temperature?", "You answer about the greenhouse.")


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - row.max() - math.log(float(np.exp(row - row.max()).sum()))


def test_mean_logprob_is_finite_not_positive_and_greedy_beats_hot_sampling(tiny_engine: Engine) -> None:
    prompt = _prompt(tiny_engine)
    greedy = tiny_engine.generate(GenerationRequest(prompt, 24)).usage.mean_logprob
    assert greedy is not None and math.isfinite(greedy) and greedy <= 0
    for seed in (1, 2, 3):
        hot = tiny_engine.generate(
            GenerationRequest(prompt, 24, SamplingParams(temperature=2.0, seed=seed))
        ).usage.mean_logprob
        assert hot is not None and math.isfinite(hot) and hot <= 0
        assert greedy > hot, (greedy, hot, seed)


def test_mean_logprob_is_the_raw_models_log_softmax_at_each_sampled_token(tiny_engine: Engine) -> None:
    """Checked against teacher-forced logits; under the raw distribution, so top_k=1 at a high
    temperature with a repetition penalty (the same tokens as greedy here) scores the same."""
    prompt = _prompt(tiny_engine)
    done = tiny_engine.generate(GenerationRequest(prompt, 20))
    sampled = done.token_ids + ([next(iter(tiny_engine.eos_ids))] if done.finish_reason == "eos" else [])
    full = tiny_engine.logits_for(prompt + sampled[:-1] if done.finish_reason == "eos" else prompt + sampled)
    rows = full[len(prompt) - 1 : len(prompt) - 1 + len(sampled)]
    want = float(np.mean([_log_softmax(r)[t] for r, t in zip(rows, sampled, strict=True)]))
    assert done.usage.mean_logprob == pytest.approx(want, abs=0.05)
    top1 = tiny_engine.generate(
        GenerationRequest(prompt, 20, SamplingParams(temperature=1.5, top_k=1, seed=3))
    )
    # the same tokens; the score to float rounding (this run reuses the cached prompt, and the
    # one-row kernel rounds the last prompt token's row apart from the many-row one)
    assert top1.token_ids == done.token_ids
    assert top1.usage.mean_logprob == pytest.approx(done.usage.mean_logprob, rel=1e-6)


def test_nothing_sampled_has_no_mean_logprob(tiny_engine: Engine) -> None:
    cancel = threading.Event()
    cancel.set()
    done = tiny_engine.generate(GenerationRequest(_prompt(tiny_engine), 8), cancel=cancel)
    assert done.finish_reason == "cancelled" and done.usage.mean_logprob is None
