"""Counters for one telemetry interval: what the router and the answering worker saw.

The router reports every request's kind and outcome, the worker every answered query's
latency, time to first token, speed, grounding and routing (the route asked, escalations made
and why one failed: exact counts, not sampled). :meth:`Metrics.take` returns the interval's
figures and starts a new interval, so each ``metrics`` record carries counts the fleet can sum.
Thread-safe: the dispatcher, the worker and the telemetry thread all touch it.
"""

from __future__ import annotations

import statistics
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

MAX_SAMPLES = 2000  # per interval: percentiles of the first ones are good enough


@dataclass(frozen=True)
class Answered:
    """One answered query, as the worker saw it."""

    latency_ms: float  # received -> final reply
    ttft_ms: float
    tokens_per_s: float
    grounded: bool
    source: str = "model"  # model | template (the fallback after the checks failed twice) | escalated
    retried: bool = False  # the first text failed the checks
    route: str = "auto"  # the request's route: local | auto | remote
    escalation_error: str | None = None  # an escalation was made and gave no usable answer: why


def _pcts(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    if len(values) == 1:
        return {"p50": round(values[0], 1), "p95": round(values[0], 1)}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 1), "p95": round(q[94], 1)}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._answers: list[Answered] = []
        self._answered = 0
        self._routes: Counter[str] = Counter()
        self._escalated = 0
        self._escalation_failed: Counter[str] = Counter()

    def request(self, kind: str, outcome: str) -> None:
        with self._lock:
            self._requests[kind][outcome] += 1

    def answered(self, a: Answered) -> None:
        with self._lock:
            self._answered += 1
            self._routes[a.route] += 1
            self._escalated += a.source == "escalated"
            if a.escalation_error is not None:
                self._escalation_failed[a.escalation_error] += 1
            if len(self._answers) < MAX_SAMPLES:
                self._answers.append(a)

    def take(self) -> dict[str, Any]:
        """The interval's figures; the counters start again from zero."""
        with self._lock:
            requests = {k: dict(c) for k, c in self._requests.items()}
            answers, count = self._answers, self._answered
            routes, escalated, failed = dict(self._routes), self._escalated, dict(self._escalation_failed)
            self._requests, self._answers, self._answered = defaultdict(Counter), [], 0
            self._routes, self._escalated, self._escalation_failed = Counter(), 0, Counter()
        speeds = [a.tokens_per_s for a in answers if a.tokens_per_s > 0]
        return {
            "requests": requests,
            "answers": {
                "count": count,
                "latency_ms": _pcts([a.latency_ms for a in answers]),
                "ttft_ms": _pcts([a.ttft_ms for a in answers]),
                "tokens_per_s_p50": round(statistics.median(speeds), 1) if speeds else None,
                "ungrounded": sum(not a.grounded for a in answers),
                "retried": sum(a.retried for a in answers),
                "fallback": sum(a.source == "template" for a in answers),
                "routes": routes,
                "escalated": escalated,
                "escalation_failed": failed,
            },
        }
