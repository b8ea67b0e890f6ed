"""Device selectors: ``hardware=aarch64,tag=site=north,pack=tiny@0.0.2,state=online``.

A selector is terms joined by ``,``; every term must hold (AND). Parsing is pure and strict
(an unknown key or an empty value is an error, not a match-nothing), so a typo in a rollout's
selector never silently selects no device, or every device. The store turns a parsed
selector into SQL (queries.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fleet.telemetry.errors import TelemetryError

KEYS = ("hardware", "tag", "pack", "state")
STATES = ("online", "offline", "updating", "paused")
MAX_SELECTOR_CHARS = 1024
MAX_TERMS = 16
_VALUE = re.compile(r"[^\x00-\x20,\x7f]{1,128}")


class SelectorError(TelemetryError):
    """A selector that does not parse; the message says which term and why."""

    code = "bad_selector"


@dataclass(frozen=True)
class Term:
    key: str  # one of KEYS
    value: str  # hardware tag, config tag, pack name, or state
    version: str | None = None  # pack=NAME@VERSION only


@dataclass(frozen=True)
class Selector:
    terms: tuple[Term, ...] = ()

    def __str__(self) -> str:
        return ",".join(f"{t.key}={t.value}" + (f"@{t.version}" if t.version else "") for t in self.terms)


def parse(text: str | None) -> Selector:
    """``None`` or ``""`` selects every device."""
    if not text:
        return Selector()
    if len(text) > MAX_SELECTOR_CHARS:
        raise SelectorError(f"a selector is at most {MAX_SELECTOR_CHARS} characters")
    parts = text.split(",")
    if len(parts) > MAX_TERMS:
        raise SelectorError(f"a selector has at most {MAX_TERMS} terms")
    return Selector(tuple(_term(p) for p in parts))


def _term(part: str) -> Term:
    key, eq, value = part.partition("=")  # a tag may hold '=' itself: tag=site=north
    if not eq or key not in KEYS:
        raise SelectorError(f"{part[:64]!r}: expected KEY=VALUE with KEY one of {', '.join(KEYS)}")
    if not _VALUE.fullmatch(value):
        raise SelectorError(f"{part[:64]!r}: the value is 1 to 128 characters without spaces")
    if key == "state" and value not in STATES:
        raise SelectorError(f"state={value[:32]}: one of {', '.join(STATES)}")
    if key == "pack" and "@" in value:
        name, _, version = value.partition("@")
        if not name or not version:
            raise SelectorError(f"{part[:64]!r}: pack=NAME or pack=NAME@VERSION")
        return Term(key, name, version)
    return Term(key, value)
