"""Grounded answers: which sensors a question is about, the facts, and the number guard.

Selection needs no model: words of the question are matched against sensor names,
aliases and units. The guard checks every number the model wrote against the facts and
the question; anything else is reported as ``ungrounded`` so an operator never has to
trust the model for a number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agent.config import SensorConfig
from agent.sensors.windows import Fact

_WORD = re.compile(r"[a-z0-9_%°]+")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)?")
_LIST_MARKER = re.compile(r"(?m)^\s*\d+[.)]\s")


def _words(text: str) -> set[str]:
    lowered = text.lower().replace("_", " ")
    return set(_WORD.findall(lowered))


def select_sensors(question: str, sensors: Iterable[SensorConfig]) -> list[SensorConfig]:
    """Sensors named in the question by name, alias or unit (e.g. '%', '°c')."""
    words = _words(question)
    text = question.lower()
    picked = []
    for s in sensors:
        names = {s.name, *s.name.split("_"), *(a.lower() for a in s.aliases)}
        by_name = any((" " in n and n in text) or n in words for n in names)
        by_unit = bool(s.unit) and s.unit.lower() in text
        if by_name or by_unit:
            picked.append(s)
    return picked


def _fmt(value: float | None) -> str:
    return "no reading" if value is None else f"{value:g}"


def facts_block(facts: list[Fact]) -> str:
    """The readings as one plain sentence (small models quote it more faithfully than a
    list, measured on the demo questions); stale ones are marked as such."""
    parts = []
    for f in facts:
        state = " (stale: no recent reading)" if f.stale else ""
        parts.append(f"the {f.sensor.replace('_', ' ')} is {_fmt(f.value)} {f.unit}".rstrip() + state)
    label = "Sensor reading" if len(parts) == 1 else "Sensor readings"
    return f"{label}: " + "; ".join(parts) + "."


def build_question(question: str, facts: list[Fact]) -> str:
    """Operator text and sensor values go in as data inside the user message."""
    if not facts:
        return question
    return f"{facts_block(facts)}\n\nQuestion: {question}"


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _matches(written: str, candidates: list[float]) -> bool:
    value = float(written)
    places = _decimals(written)
    return any(abs(round(c, places) - value) < 1e-9 or abs(c - value) < 1e-9 for c in candidates)


def ungrounded_numbers(answer: str, facts: list[Fact], question: str) -> list[str]:
    """Numbers in ``answer`` that equal no fact and no number of the question at the
    precision written (list markers like '1.' at a line start are not claims)."""
    candidates = [f.value for f in facts if f.value is not None]
    candidates += [float(n.replace(",", ".")) for n in _NUMBER.findall(question)]
    body = _LIST_MARKER.sub(" ", answer)
    out = []
    for raw in _NUMBER.findall(body):
        written = raw.replace(",", ".").lstrip("+")
        if not _matches(written, candidates) and written not in out:
            out.append(written)
    return out
