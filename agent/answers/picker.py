"""Which sensors a question is about, by whole words and phrases, ranked, with the reason.

Why: today's picker matched a unit as a substring (``C`` in "rack", "much", "co2"), any part of
a sensor's name (``rack`` pulled in every rack sensor) and never an alias with punctuation
(``pm2.5``). A question about one sensor must get that sensor's fact alone.

Rules (tokens from text.py, so ``pm2.5`` and ``°c`` are whole tokens):

- Evidence for a sensor, strongest first: its full name as a phrase (``soil moisture``,
  ``soil_moisture``) 100; an alias phrase 80; consecutive parts of its name (``rack fan`` of
  ``rack_fan_rpm``) 30 per part; a *descriptor* alias (an adjective such as ``hot``, ``dry``,
  ``wet`` that describes a value rather than names a sensor) 20; its unit (or one convertible
  to it; "degrees" after a number for a temperature) as a standalone token 10. The last word of
  a phrase may take a plural s/es.
- A token covered by several sensors' matches belongs to the sensor(s) with the strongest match
  there; a tie goes to the sensor with more evidence in the whole question, then to the one
  whose unit the question names; a remaining tie keeps all ("the rack" with two rack sensors).
- A unit used as a noun, not after a number ("ppm levels", "how many µg/m³"), that exactly one
  sensor has, names that sensor (40); ``%`` and single letters never do.
- A sensor is picked when it owns a token through a name, alias, name-part or unit-noun match. Descriptor
  aliases and units pick only when nothing else names a sensor (then every sensor they match is
  picked: "is it above 30 °C?" with two °C sensors gives both). A single-letter unit (``C``,
  ``V``, ``m``) counts only right after a number ("30 C"): too many words collide with it.
- "all sensors", "everything", "all readings", "status", "overview" pick every sensor.

Each pick says why (the matched phrase and its kind) for logs and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent import units
from agent.answers.text import find_phrase, phrase, tokenize
from agent.config import SensorConfig

NAME, ALIAS, PART, DESCRIPTOR, UNIT, ALL = "name", "alias", "part", "descriptor", "unit", "all"
UNIT_NOUN = "unit_noun"
WEIGHTS = {NAME: 100, ALIAS: 80, UNIT_NOUN: 40, PART: 30, DESCRIPTOR: 20, UNIT: 10, ALL: 1}
STRONG = frozenset({NAME, ALIAS, PART, UNIT_NOUN})

DESCRIPTORS = frozenset(
    {
        "hot", "cold", "warm", "cool", "heat", "dry", "wet", "damp", "humid", "moist", "water", "watering",
        "full", "empty", "high", "low", "fast", "slow", "loud", "bright", "dark", "fresh", "stuffy",
    }
)  # fmt: skip

_ALL_PHRASES = (
    ("all", "sensors"),
    ("all", "the", "sensors"),
    ("all", "readings"),
    ("all", "the", "readings"),
    ("all", "values"),
    ("every", "sensor"),
    ("each", "sensor"),
    ("everything",),
    ("status",),
    ("overview",),
    ("summary",),
)


@dataclass(frozen=True)
class Pick:
    """One sensor the question is about, and why."""

    sensor: SensorConfig
    phrase: str  # the words of the question that matched, as written lower-cased
    kind: str  # name | alias | part | descriptor | unit | all
    score: int  # the sum of its matches' weights
    position: int  # token index of its first match (binds comparisons to sensors)

    @property
    def name(self) -> str:
        return self.sensor.name

    def to_json(self) -> dict[str, object]:
        return {"sensor": self.sensor.name, "phrase": self.phrase, "kind": self.kind, "score": self.score}


@dataclass(frozen=True)
class _Match:
    index: int  # sensor's index in the config
    kind: str
    start: int
    end: int  # token span [start, end)

    @property
    def weight(self) -> int:
        return WEIGHTS[self.kind] * (self.end - self.start if self.kind == PART else 1)


def _name_phrases(s: SensorConfig) -> list[tuple[str, ...]]:
    spaced = phrase(s.name)
    return [spaced] + ([(s.name.lower(),)] if len(spaced) > 1 else [])


def _alias_matches(i: int, s: SensorConfig, toks: list[str]) -> list[_Match]:
    out = []
    for alias in s.aliases:
        target = phrase(alias)
        kind = DESCRIPTOR if len(target) == 1 and target[0] in DESCRIPTORS else ALIAS
        out += [_Match(i, kind, h, h + len(target)) for h in find_phrase(toks, target)]
    return out


def _part_matches(i: int, s: SensorConfig, toks: list[str]) -> list[_Match]:
    """Runs of consecutive tokens that are consecutive parts of a multi-part name."""
    parts = phrase(s.name)
    if len(parts) < 2:
        return []
    out, j = [], 0
    while j < len(toks):
        best = 0
        for k in range(len(parts)):
            n = 0
            while (
                j + n < len(toks) and k + n < len(parts) and toks[j + n] in (parts[k + n], parts[k + n] + "s")
            ):
                n += 1
            best = max(best, n)
        if best:
            out.append(_Match(i, PART, j, j + best))
            j += best
        else:
            j += 1
    return out


def _unit_matches(i: int, s: SensorConfig, toks: list[str], kinds: list[str]) -> list[_Match]:
    """The sensor's unit (or one convertible to it) as a standalone token. A single-letter
    spelling (``C``, ``V``) counts only right after a number ("30 C")."""
    if not s.unit or units.normalize(s.unit) in (None, units.DEGREES):
        return []
    out = []
    j = 0
    while j < len(toks):
        after_number = j > 0 and kinds[j - 1] == "num"
        two = f"{toks[j]} {toks[j + 1]}" if j + 1 < len(toks) else ""
        if two and units.lookup(two) and units.compatible(two, s.unit):
            out.append(_Match(i, UNIT, j, j + 2))
            j += 2
            continue
        tok = toks[j]
        if after_number and units.normalize(tok) == units.DEGREES and _is_temperature(s.unit):
            out.append(_Match(i, UNIT, j, j + 1))  # "30 degrees": the sensor's own scale
            j += 1
            continue
        long_enough = len(tok.strip("°")) > 1 or tok.startswith("°") or tok == "%"
        if units.lookup(tok) and units.compatible(tok, s.unit) and (long_enough or after_number):
            out.append(_Match(i, UNIT, j, j + 1))
        j += 1
    return out


def _is_temperature(unit: str) -> bool:
    found = units.lookup(unit)
    return found is not None and found.dimension == "temperature"


def _unit_nouns(matches: list[_Match], kinds: list[str], n_sensors: int) -> list[_Match]:
    """A unit used as a noun ("ppm levels", "how many µg/m³"), not after a number, that only one
    sensor has: it names that sensor (weight 40, strong). "%" never does (too many shares)."""
    by_span: dict[tuple[int, int], list[_Match]] = {}
    for m in matches:
        if m.kind == UNIT:
            by_span.setdefault((m.start, m.end), []).append(m)
    out = []
    for (start, end), ms in by_span.items():
        if len(ms) == 1 and n_sensors and (start == 0 or kinds[start - 1] != "num"):
            out.append(_Match(ms[0].index, UNIT_NOUN, start, end))
    return out


def _noun_ok(m: _Match, toks: list[str]) -> bool:
    return toks[m.start] not in ("%", "%rh") and len(toks[m.start].strip("°")) > 1


def _matches(sensors: Sequence[SensorConfig], toks: list[str], kinds: list[str]) -> list[_Match]:
    found: list[_Match] = []
    for i, s in enumerate(sensors):
        for target in _name_phrases(s):
            found += [_Match(i, NAME, h, h + len(target)) for h in find_phrase(toks, target)]
        found += _alias_matches(i, s, toks) + _part_matches(i, s, toks) + _unit_matches(i, s, toks, kinds)
    return found + [m for m in _unit_nouns(found, kinds, len(sensors)) if _noun_ok(m, toks)]


def _owners(matches: list[_Match], totals: dict[int, int], unit_named: set[int]) -> dict[int, set[int]]:
    """token index -> sensor indexes that own it (see the module docstring for ties)."""
    owners: dict[int, set[int]] = {}
    for pos in {p for m in matches for p in range(m.start, m.end)}:
        here = [m for m in matches if m.start <= pos < m.end]
        best: dict[int, int] = {}
        for m in here:
            best[m.index] = max(best.get(m.index, 0), m.weight)
        top = max(best.values())
        tied = [i for i, w in best.items() if w == top]
        top_total = max(totals[i] for i in tied)
        tied = [i for i in tied if totals[i] == top_total]
        if len(tied) > 1 and unit_named & set(tied):
            tied = [i for i in tied if i in unit_named]
        owners[pos] = set(tied)
    return owners


def asks_for_all(question: str) -> bool:
    """ "all sensors", "everything", "status" ... : the question is about every sensor."""
    toks = [t.text for t in tokenize(question)]
    return any(find_phrase(toks, p, plural=False) for p in _ALL_PHRASES)


def pick_sensors(question: str, sensors: Sequence[SensorConfig], all_words: bool = True) -> list[Pick]:
    """The sensors the question is about, in the order the question names them (``all_words``
    False: "everything", "status" ... do not pick every sensor; used on answer texts)."""
    tokens = tokenize(question)
    toks, kinds = [t.text for t in tokens], [t.kind for t in tokens]
    matches = _matches(sensors, toks, kinds)
    if all_words and asks_for_all(question):
        return [Pick(s, "all", ALL, WEIGHTS[ALL], 0) for s in sensors]
    totals: dict[int, int] = {}
    for m in matches:
        totals[m.index] = totals.get(m.index, 0) + m.weight
    unit_named = {m.index for m in matches if m.kind == UNIT}
    strong = [m for m in matches if m.kind in STRONG]
    chosen: list[_Match] = []
    if strong:
        owners = _owners(strong, totals, unit_named)
        chosen = [m for m in strong if any(m.index in owners[p] for p in range(m.start, m.end))]
    else:
        chosen = [m for m in matches if m.kind == DESCRIPTOR]
        if not chosen:
            chosen = [m for m in matches if m.kind == UNIT]
    best: dict[int, _Match] = {}
    for m in chosen:
        cur = best.get(m.index)
        if cur is None or m.weight > cur.weight:
            best[m.index] = m
    first = {i: min(m.start for m in chosen if m.index == i) for i in best}
    order = sorted(best, key=lambda i: (first[i], i))
    return [
        Pick(sensors[i], " ".join(toks[best[i].start : best[i].end]), best[i].kind, totals[i], first[i])
        for i in order
    ]
