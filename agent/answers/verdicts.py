"""Deterministic verdicts from a fact, the sensor's meaning and the intent.

Why: the model phrases, the rules judge. A verdict is computed only from the reading and the
configured meaning, so "18.9 % is high" can be caught as a contradiction and a yes/no question
gets its Yes or No from arithmetic, not from a 135M model.

Rules:

- No usable reading (no fact, ``stale``, or a null value) gives ``verdict: "unknown"`` and
  ``answer: null`` whatever was asked: a stale reading never yields a Yes or No. The reason says
  which ("no recent reading", "fewer than two readings in the window" for a trend).
- An intent that cannot be answered exactly (a unit that does not convert, no bands) is
  ``unknown`` with the intent's reason.
- ``band``: the band holding the value read (the asked aggregate's value when one was asked);
  None without bands, for trends, and outside closed outer edges.
- compare: ``value op threshold`` in the sensor's unit, exactly (no tolerance: 1000 is not above
  1000). ``verdict`` is "yes" or "no".
- band asks: low/high -> the band's side; ok -> an ok band; not_ok -> any other band (a value
  outside every band is ``unknown``); label words -> the band's label is one of those asked;
  not_low/not_high ("warm enough") -> the band is not on that side. ``verdict`` "yes"/"no".
- trend: the ``trend`` aggregate is a least-squares slope in units per minute. It is ``rising``
  above ``+tolerance``, ``falling`` below ``-tolerance``, else ``steady``. The tolerance is the
  meaning's ``steady_per_min`` when set; else 0.1 % of the ok range's width per minute (25-60 %
  -> 0.035 %/min, about 2 % an hour) when the ok range is finite; else 0.1 % of the current level
  per minute when the caller passes it; else 0 (any slope has a direction). A direction asked
  ("is it rising?") gives "yes"/"no"; "trend"/"changing?" without one gives the direction word
  (``changing`` is yes when not steady).
- plain values: ``verdict`` is the band label, or "reading" without bands.

``answer`` is True/False for every decided comparison, band ask and trend with a direction;
``yes_no`` says the question wants that answer first in the text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from agent.answers.intent import BAND, COMPARE, TREND, Intent
from agent.meaning import Band, Meaning
from agent.sensors.windows import Fact

UNKNOWN = "unknown"
_OPS = {
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
}


@dataclass(frozen=True)
class Verdict:
    sensor: str
    verdict: str  # yes | no | <band label> | reading | rising | falling | steady | unknown
    band: str | None
    answer: bool | None
    yes_no: bool
    kind: str  # the intent's kind: value | compare | band | trend
    value: float | None
    unit: str
    agg: str
    window_s: float | None
    stale: bool
    op: str | None = None
    threshold: float | None = None
    threshold_text: str | None = None  # as asked: "2.5 bar"
    asked: str | None = None
    side: str | None = None  # the band's side: low | high | ok | None
    band_info: Band | None = None
    ok_range: tuple[float, float] | None = None
    direction: str | None = None  # trend: rising | falling | steady
    tolerance: float | None = None  # trend: units per minute
    level: float | None = None  # trend: the current value, when the caller read it
    age_s: float | None = None
    reason: str | None = None

    @property
    def limit(self) -> float | None:
        """The edge that separates the value's band from ok: the top of a low band, the bottom
        of a high band (None for ok bands, open edges and no band)."""
        b = self.band_info
        if b is None or b.ok:
            return None
        edge = b.high if b.side == "low" else b.low if b.side == "high" else math.nan
        return None if not math.isfinite(edge) else edge

    def figures(self) -> list[float]:
        """Every number this verdict may put in a text (values a checked text may quote)."""
        out = [
            x for x in (self.value, self.threshold, self.limit, self.tolerance, self.level) if x is not None
        ]
        if self.value is not None and self.kind != TREND:  # "450 ppm above the limit"
            out += [abs(self.value - x) for x in (self.threshold, self.limit) if x is not None]
        if self.value is not None and self.kind == TREND:
            out.append(abs(self.value))
        if self.ok_range:
            out += [x for x in self.ok_range if math.isfinite(x)]
        if self.age_s is not None:
            out += [self.age_s, self.age_s / 60, self.age_s / 3600]
        if self.window_s:
            out += [self.window_s, self.window_s / 60, self.window_s / 3600]
        return out

    def to_json(self) -> dict[str, Any]:
        """The shape of a verdict in the reply (documented in docs/answers.md)."""
        return {
            "sensor": self.sensor,
            "verdict": self.verdict,
            "band": self.band,
            "answer": self.answer,
            "yes_no": self.yes_no,
            "kind": self.kind,
            "value": self.value,
            "unit": self.unit,
            "agg": self.agg,
            "window_s": self.window_s,
            "stale": self.stale,
            "op": self.op,
            "threshold": self.threshold,
            "threshold_text": self.threshold_text,
            "asked": self.asked,
            "side": self.side,
            "limit": self.limit,
            "ok_range": _range_json(self.ok_range),
            "direction": self.direction,
            "tolerance_per_min": self.tolerance,
            "level": self.level,
            "age_s": None if self.age_s is None else round(self.age_s, 1),
            "reason": self.reason,
        }


def _range_json(r: tuple[float, float] | None) -> list[float | None] | None:
    return None if r is None else [x if math.isfinite(x) else None for x in r]


def trend_tolerance(meaning: Meaning | None, level: float | None = None) -> float:
    """Units per minute under which a slope counts as steady (rules in the module docstring)."""
    if meaning is not None and meaning.steady_per_min is not None:
        return meaning.steady_per_min
    ok = meaning.ok_range() if meaning else None
    if ok and math.isfinite(ok[0]) and math.isfinite(ok[1]) and ok[1] > ok[0]:
        return (ok[1] - ok[0]) * 0.001
    if level is not None and math.isfinite(level):
        return abs(level) * 0.001
    return 0.0


def _band_answer(intent: Intent, band: Band) -> bool:
    side = intent.side
    if intent.labels:
        inside = band.label in intent.labels
        return not inside if side == "not" else inside
    if side == "ok":
        return band.ok
    if side == "not_ok":
        return not band.ok
    if side in ("low", "high"):
        return band.side == side
    if side in ("not_low", "not_high"):
        return band.side != side[4:]
    raise ValueError(f"unknown band side {side!r}")


def _unknown(base: Verdict, reason: str) -> Verdict:
    return replace(base, verdict=UNKNOWN, answer=None, band=None, reason=reason)


def decide(
    fact: Fact | None,
    intent: Intent,
    meaning: Meaning | None,
    now: float | None = None,
    level: float | None = None,
) -> Verdict:
    """The verdict for one sensor. ``now`` (Unix time) gives the reading's age for the reply
    and the template; ``level`` (the current value) helps a trend's default tolerance."""
    age = now - fact.ts if fact is not None and fact.ts is not None and now is not None else None
    base = Verdict(
        sensor=intent.sensor,
        verdict=UNKNOWN,
        band=None,
        answer=None,
        yes_no=intent.yes_no,
        kind=intent.kind,
        value=fact.value if fact else None,
        unit=fact.unit if fact else "",
        agg=fact.agg if fact else intent.agg,
        window_s=fact.window_s if fact else intent.window_s,
        stale=fact.stale if fact else True,
        op=intent.op,
        threshold=intent.threshold,
        threshold_text=intent.threshold_text,
        asked=intent.asked,
        age_s=None if age is None else max(age, 0.0),
    )
    if fact is None or fact.ts is None:
        return _unknown(base, "no reading")
    if fact.stale:
        return _unknown(base, "no recent reading")
    if fact.value is None:
        return _unknown(
            base, "fewer than two readings in the window" if fact.agg == "trend" else "no reading"
        )
    if intent.reason:
        return _unknown(base, intent.reason)
    value = fact.value
    if intent.kind == TREND:
        return _trend(base, value, intent, meaning, level)
    band = meaning.band_of(value) if meaning else None
    side = None if band is None else "ok" if band.ok else band.side
    ok_range = meaning.ok_range() if meaning else None
    base = replace(base, band=band.label if band else None, band_info=band, side=side, ok_range=ok_range)
    if intent.kind == COMPARE:
        assert intent.op is not None and intent.threshold is not None
        result = _OPS[intent.op](value, intent.threshold)
        return replace(base, verdict="yes" if result else "no", answer=result)
    if intent.kind == BAND:
        if band is None:
            reason = (
                f"no bands for {intent.sensor}" if not meaning or not meaning.bands else "outside the bands"
            )
            return _unknown(base, reason)
        result = _band_answer(intent, band)
        return replace(base, verdict="yes" if result else "no", answer=result)
    return replace(base, verdict=band.label if band else "reading")


def _trend(
    base: Verdict, slope: float, intent: Intent, meaning: Meaning | None, level: float | None
) -> Verdict:
    tol = trend_tolerance(meaning, level)
    base = replace(base, level=level if level is not None and math.isfinite(level) else None)
    direction = "rising" if slope > tol else "falling" if slope < -tol else "steady"
    base = replace(base, direction=direction, tolerance=tol)
    if intent.direction is None:
        return replace(base, verdict=direction)
    answer = direction != "steady" if intent.direction == "changing" else direction == intent.direction
    return replace(base, verdict="yes" if answer else "no", answer=answer)


def overall_answer(verdicts: Sequence[Verdict]) -> bool | None:
    """The Yes/No a whole answer must start with: the common answer of the yes/no verdicts;
    None when there are none, when one is unknown, or when they differ ("A and B?" with one
    yes and one no is left to the text: no leading word is enforced)."""
    asked = [v for v in verdicts if v.yes_no]
    if not asked or any(v.answer is None for v in asked):
        return None
    answers = {v.answer for v in asked}
    return answers.pop() if len(answers) == 1 else None
