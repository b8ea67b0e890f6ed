"""The fallback answer: one plain sentence per sensor from the facts and verdicts, never silent.

Why: after a failed validation and a failed retry the operator still gets an answer, and one
that is right by construction: its numbers are the facts' (rounded as ``fmt`` says), its
verdict words are the computed ones, and a yes/no question gets the computed Yes or No first.
Tests run every case of tests/answer_cases.yaml through ``validate`` to keep it so.

Examples: "Yes: CO2 is 1450 ppm, above 1000 ppm." / "Soil moisture is 18.9 %, below the 25 %
limit (too dry)." / "There is no recent soil moisture reading (the last one is 12 min old):
cannot say."
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from agent import units
from agent.answers.intent import COMPARE, TREND
from agent.answers.verdicts import UNKNOWN, Verdict, overall_answer

NO_SENSOR = "No sensor of this device matches the question, so there is no reading to report."
_AGG_WORDS = {"mean": "the mean", "min": "the lowest", "max": "the highest"}
_TRUE = {">": "above", ">=": "at least", "<": "below", "<=": "at most"}
_FALSE = {">": "not above", ">=": "below", "<": "not below", "<=": "above"}


def fmt(value: float) -> str:
    """A value as the template writes it: 1 decimal from 100 up, 2 from 1 up, 3 significant
    digits below 1; trailing zeros dropped (1450.0 -> "1450", 24.4333 -> "24.43")."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    size = abs(value)
    places = 1 if size >= 100 else 2 if size >= 1 else 2 - math.floor(math.log10(size))
    text = f"{value:.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def display_name(sensor: str) -> str:
    """``soil_moisture`` -> "soil moisture"; ``co2`` -> "CO2"; ``pm2_5`` -> "PM2.5"."""
    if re.fullmatch(r"[a-z]+\d+(_\d+)?", sensor):
        return sensor.upper().replace("_", ".")
    return sensor.replace("_", " ")


def span_text(seconds: float) -> str:
    """A window as words: 3600 -> "hour", 7200 -> "2 h", 600 -> "10 min", 45 -> "45 s"."""
    if seconds == 3600:
        return "hour"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{fmt(seconds)} s"


def age_text(age_s: float) -> str:
    if age_s >= 7200:
        return f"{fmt(round(age_s / 3600, 1))} h"
    if age_s >= 120:
        return f"{round(age_s / 60)} min"
    return f"{round(age_s)} s"


def _quantity(value: float, unit: str) -> str:
    return f"{fmt(value)} {unit}".rstrip()


def _subject(v: Verdict) -> str:
    name = display_name(v.sensor)
    if v.agg in _AGG_WORDS:
        window = f" over the last {span_text(v.window_s)}" if v.window_s else ""
        return f"{_AGG_WORDS[v.agg]} {name}{window}"
    return name


def _threshold(v: Verdict) -> str:
    assert v.threshold is not None
    own = _quantity(v.threshold, v.unit)
    asked = v.threshold_text
    if (
        not asked
        or len(asked.split()) == 1
        or units.normalize(asked.split(" ", 1)[1]) == units.normalize(v.unit)
    ):
        return own
    return f"{asked} ({own})"


def _band_clause(v: Verdict) -> str:
    b = v.band_info
    if b is None:
        return ""
    words = " ".join(b.words)
    limit = v.limit
    if b.ok:
        if v.ok_range and all(math.isfinite(x) for x in v.ok_range):
            lo, hi = v.ok_range
            return f", within the {words} range of {fmt(lo)} to {_quantity(hi, v.unit)}"
        return f", within the {words} range"
    if limit is not None and b.side == "low":
        rel = "at or below" if b.high_inclusive else "below"
        return f", {rel} the {_quantity(limit, v.unit)} limit ({words})"
    if limit is not None and b.side == "high":
        rel = "at or above" if b.low_inclusive else "above"
        return f", {rel} the {_quantity(limit, v.unit)} limit ({words})"
    return f" ({words})"


def _unknown(v: Verdict) -> str:
    name = display_name(v.sensor)
    if v.reason == "no recent reading" and v.age_s is not None:
        return f"there is no recent {name} reading (the last one is {age_text(v.age_s)} old): cannot say."
    if v.reason in ("no recent reading", "no reading"):
        return f"there is no recent {name} reading: cannot say."
    if v.reason and v.reason.startswith("fewer than two"):
        window = span_text(v.window_s) if v.window_s else "window"
        return f"there are not enough {name} readings in the last {window} to tell a trend: cannot say."
    assert v.value is not None
    now = f"{_subject(v)} is {_quantity(v.value, v.unit)}"
    if v.kind == COMPARE:
        asked = v.threshold_text or "that threshold"
        return f"{now}; {asked} cannot be compared with {v.unit or 'it'}: cannot say."
    return f"{now}; no bands are configured for it: cannot judge."


def _trend(v: Verdict) -> str:
    assert v.value is not None and v.direction is not None
    rate = f"{'+' if v.value > 0 else ''}{fmt(v.value)} {v.unit} per minute".replace("  ", " ")
    window = f" over the last {span_text(v.window_s)}" if v.window_s else ""
    name = display_name(v.sensor)
    if v.level is not None:
        name = f"{name} is {_quantity(v.level, v.unit)} and"
    if v.direction == "steady":
        return f"{name} is steady ({rate}{window}, within {fmt(v.tolerance or 0)} per minute)."
    return f"{name} is {v.direction} ({rate}{window})."


def sentence(v: Verdict) -> str:
    """One sentence for one verdict (without the leading Yes/No; lower-case first, the caller
    capitalises where it starts the text)."""
    if v.verdict == UNKNOWN:
        return _unknown(v)
    if v.kind == TREND:
        return _trend(v)
    assert v.value is not None
    subject = _subject(v)
    now = f"{subject} is {_quantity(v.value, v.unit)}"
    if v.kind == COMPARE:
        assert v.op is not None
        rel = _TRUE[v.op] if v.answer else _FALSE[v.op]
        return f"{now}, {rel} {_threshold(v)}."
    return f"{now}{_band_clause(v)}."


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def template_answer(verdicts: Sequence[Verdict]) -> str:
    """The whole fallback answer; "Yes: " or "No: " first when the question's answer is known."""
    if not verdicts:
        return NO_SENSOR
    overall = overall_answer(verdicts)
    parts = [sentence(v) for v in verdicts]
    if overall is None:
        mixed = [v for v in verdicts if v.yes_no and v.answer is not None]
        if len(mixed) > 1:  # "A and B?" with different answers: each sentence says its own
            parts = [
                f"{'Yes' if v.answer else 'No'}: {p}" if v in mixed else _capital(p)
                for v, p in zip(verdicts, parts, strict=True)
            ]
            return " ".join(parts)
        return " ".join(_capital(p) for p in parts)
    return f"{'Yes' if overall else 'No'}: " + " ".join([parts[0], *(_capital(p) for p in parts[1:])])
