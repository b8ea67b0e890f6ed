"""The halt rules: is a wave failing, or did the updated devices get worse? Pure functions
of the figures; the driver gathers them and acts on the verdict.

Regressions compare each updated device with itself: its metrics records in the hour before
its instruction against those after it confirmed the new pack (so a slow board is compared
with its own past, not with a fast one). A device needs ``min_samples`` records carrying the
figure on each side to count. The fleet-level figure is the median over devices of each
device's change, so one noisy board neither halts a rollout nor hides a real regression, and
no verdict is given before half of the wave's updated devices can be judged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.rollouts import states
from fleet.rollouts.spec import Rules

NOT_ERRORS = ("ok", "queued")  # request outcomes that are not failures
# A verdict needs this share of the wave's updated devices to have the figure on both sides:
# the first one to report must not halt (or pass) a wave alone.
MIN_JUDGED_SHARE = 0.5


@dataclass(frozen=True)
class Halt:
    """Why a rollout stopped: the rule, the wave, the devices at fault and the figures."""

    rule: str  # failure_rate, tokens_per_s, ttft, error_rate, validation
    wave: int
    devices: list[str]
    figures: dict[str, Any]
    message: str
    at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Samples:
    """One device's metrics records' data, before its instruction and after it confirmed."""

    before: Sequence[Mapping[str, Any]] = field(default_factory=list)
    after: Sequence[Mapping[str, Any]] = field(default_factory=list)


def failure_rate(wave: int, device_states: Mapping[str, str], rules: Rules) -> Halt | None:
    """Failed or rolled back over the wave's devices that got (or will get) the instruction:
    skipped, expired and aborted ones are not judged. Checked as results come in; failures
    only grow, so a wave that is over the threshold now stays over it."""
    judged = {
        d: s for d, s in device_states.items() if s not in (states.SKIPPED, states.EXPIRED, states.ABORTED)
    }
    failed = sorted(d for d, s in judged.items() if s in states.FAILURES)
    if not judged or len(failed) / len(judged) <= rules.max_failure_rate:
        return None
    rate = len(failed) / len(judged)
    return Halt(
        "failure_rate",
        wave,
        failed,
        {
            "failed": len(failed),
            "devices": len(judged),
            "rate": round(rate, 4),
            "max": rules.max_failure_rate,
        },
        f"wave {wave}: {len(failed)} of {len(judged)} devices failed or rolled back "
        f"({rate:.0%} > {rules.max_failure_rate:.0%})",
    )


def regression(wave: int, samples: Mapping[str, Samples], rules: Rules) -> Halt | None:
    """The first rule the wave's updated devices break, or None."""
    checks = (
        ("tokens_per_s", _tokens_per_s, "ratio", 1 - rules.tokens_per_s_drop, "below"),
        ("ttft", _ttft, "ratio", 1 + rules.ttft_rise, "above"),
        ("error_rate", _error_rate, "delta", rules.error_rate_rise, "above"),
        ("validation", _validation, "delta", rules.validation_rise, "above"),
    )
    for rule, figure, how, limit, bad in checks:
        found = _judge(rule, wave, samples, rules.min_samples, figure, how, limit, bad)
        if found is not None:
            return found
    return None


def _judge(
    rule: str,
    wave: int,
    samples: Mapping[str, Samples],
    min_samples: int,
    figure: Any,
    how: str,
    limit: float,
    bad: str,
) -> Halt | None:
    changes: dict[str, tuple[float, float, float]] = {}
    for device, s in samples.items():
        before, after = figure(s.before, min_samples), figure(s.after, min_samples)
        if before is None or after is None or (how == "ratio" and before <= 0):
            continue
        change = after / before if how == "ratio" else after - before
        changes[device] = (before, after, change)
    if not changes or len(changes) < math.ceil(MIN_JUDGED_SHARE * len(samples)):
        return None  # too few of the wave's updated devices reported it yet to say
    median = statistics.median(c for _, _, c in changes.values())
    broken = median < limit if bad == "below" else median > limit
    if not broken:
        return None
    worse = sorted(d for d, (_, _, c) in changes.items() if (c < limit if bad == "below" else c > limit))
    figures = {
        "devices_judged": len(changes),
        f"median_{how}": round(median, 4),
        "limit": round(limit, 4),
        "before_median": round(statistics.median(b for b, _, _ in changes.values()), 3),
        "after_median": round(statistics.median(a for _, a, _ in changes.values()), 3),
    }
    word = "ratio after/before" if how == "ratio" else "increase"
    return Halt(
        rule,
        wave,
        worse,
        figures,
        f"wave {wave}: {rule} {word} {median:.3g} is {bad} the limit {limit:.3g} "
        f"over {len(changes)} updated devices (median before {figures['before_median']}, "
        f"after {figures['after_median']})",
    )


def _median_of(values: list[float], min_samples: int) -> float | None:
    return statistics.median(values) if len(values) >= min_samples else None


def _tokens_per_s(records: Sequence[Mapping[str, Any]], n: int) -> float | None:
    return _median_of([v for r in records if (v := _num(r, "answers", "tokens_per_s_p50")) is not None], n)


def _ttft(records: Sequence[Mapping[str, Any]], n: int) -> float | None:
    return _median_of([v for r in records if (v := _num(r, "answers", "ttft_ms", "p50")) is not None], n)


def _error_rate(records: Sequence[Mapping[str, Any]], n: int) -> float | None:
    """Failed requests over all requests, pooled over the records that had any."""
    errors = total = used = 0
    for r in records:
        requests = r.get("requests")
        if not isinstance(requests, Mapping):
            continue
        counted = [
            (outcome, c)
            for by in requests.values()
            if isinstance(by, Mapping)
            for outcome, c in by.items()
            if isinstance(c, int) and not isinstance(c, bool)
        ]
        if counted:
            used += 1
            total += sum(c for _, c in counted)
            errors += sum(c for o, c in counted if o not in NOT_ERRORS)
    return errors / total if used >= n and total else None


def _validation(records: Sequence[Mapping[str, Any]], n: int) -> float | None:
    """Answers whose model text failed the checks over answers, pooled: ``answers.retried``
    (every final answer passes its checks now, so ``ungrounded`` stays 0; an agent older
    than the checks reports only ``ungrounded``, which is used then)."""
    bad = count = used = 0
    for r in records:
        c = _num(r, "answers", "count")
        u = _num(r, "answers", "retried")
        if u is None:
            u = _num(r, "answers", "ungrounded")
        if c and u is not None:
            used += 1
            count += int(c)
            bad += int(u)
    return bad / count if used >= n and count else None


def _num(record: Mapping[str, Any], *path: str) -> float | None:
    value: Any = record
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
