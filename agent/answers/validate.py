"""Checks of a generated answer against the facts and the verdicts.

Why: ``grounded: true`` used to mean only "every number is some fact's"; the demo's "18.9 % is
high" and "No" to "Should I water?" at 12.5 % passed it. Each check here looks for one kind of
contradiction, and the reply says which passed and which failed, with the offending words.

``Checks.to_json()`` is ``{name: "passed" | "skipped" | {"failed": [words, ...]}}`` for the names
below, always all five, e.g. ``{"numbers": "passed", "units": "passed", "verdicts": {"failed":
["high", "not extremely low"]}, "yes_no": "skipped", "sensors": "passed"}``.

- ``numbers``: every number in the text equals a fact, a verdict figure (threshold, band edge,
  ok range, trend tolerance, window, age) or a number of the question at the precision written
  (rounding counts as equal; list markers like ``1.`` at a line start are not claims). A number
  followed by a unit is compared with the candidates converted to that unit ("81.5 °F" for a
  27.5 °C fact). Offenders: the numbers as written.
- ``units``: a number that equals a candidate only in another dimension ("18.9 °C" where the
  fact is 18.9 %). Offenders: "number unit".
- ``verdicts``: claims that contradict a verdict: band words ("high", "too dry", "fine", "ok",
  "normal", "a problem", a band label's words) against the value's band; comparisons ("above
  1000 ppm", "not below 25 %", "at or below the 25 % limit") against the value read; trend words
  ("rising", "stable") against the computed direction. A negation ("not", "n't", "never",
  "nothing", "no" right before) within three words turns a claim around ("not too dry",
  "no problem"), up to a but/and/or. A claim is checked against the sensors named in its
  sentence (else the last sentence's, else all) and fails only if it contradicts every one of
  them. Domain adjectives (hot, dry, wet, full ...) count only for sensors of a fitting dimension
  or whose band labels use them; stale or unknown verdicts are not judged. Offenders: the claim
  as written ("high", "not extremely low", "not above 1000 ppm").
- ``yes_no``: when the verdicts give the question one Yes or No, the text's first word must be
  it ("yes"/"yeah"/"yep", "no"/"nope"). When a yes/no verdict is unknown (a stale reading, a unit
  that does not convert) the text must not start with Yes or No. Else skipped.
- ``sensors``: configured sensors the text names (by full name or alias) that the question was
  not about. Offenders: the sensor names.

What the checks do not promise: that the text answers the question well, that words outside
these lists are right, or anything about a sensor the question did not pick.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent import units
from agent.answers.picker import ALIAS, NAME, pick_sensors
from agent.answers.text import Token, decimals, find_phrase, is_negation, parse_number, tokenize
from agent.answers.verdicts import UNKNOWN, Verdict, overall_answer
from agent.config import SensorConfig
from agent.meaning import Meaning
from agent.sensors.windows import Fact

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
CHECKS = ("numbers", "units", "verdicts", "yes_no", "sensors")

_LIST_MARKER = re.compile(r"(?m)^\s*\d+[.)]\s")
_CLAUSE = re.compile(r"[!?;\n]|\.(?!\d)")
_STOP = frozenset({"but", "and", "or", "yet", "though", "although", "however"})
_ADVERBS = frozenset({"too", "very", "extremely", "that", "so", "really", "quite", "overly", "particularly"})
_TIME_WORDS = frozenset({"s", "sec", "secs", "second", "seconds", "min", "mins", "minute", "minutes"})
_TIME_WORDS |= frozenset({"h", "hr", "hrs", "hour", "hours", "day", "days", "ago", "old"})

_YES = frozenset({"yes", "yeah", "yep", "correct", "true"})
_NO = frozenset({"no", "nope", "false"})

_HIGH = frozenset({"high", "elevated", "excessive"})
_LOW = frozenset({"low", "insufficient"})
_OK = frozenset({"ok", "okay", "fine", "normal", "acceptable", "healthy"})
_NOT_OK = frozenset({"problem", "problematic", "concern", "concerning", "alarming", "dangerous", "abnormal"})
_NOT_OK |= frozenset({"worry", "worrying"})
_OK_PHRASES = (("in", "range"), ("within", "range"), ("in", "the", "normal", "range"))
_DIMENSION_WORDS = {
    "temperature": {"hot": "high", "warm": "high", "cold": "low", "cool": "low", "freezing": "low"},
    "share": {"dry": "low", "wet": "high", "humid": "high", "damp": "high", "full": "high", "empty": "low"},
    "length": {"full": "high", "empty": "low"},
    "volume": {"full": "high", "empty": "low"},
}
_CLAIM_OPS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("at", "or", "below"), "<="),
    (("at", "or", "above"), ">="),
    (("at", "least"), ">="),
    (("at", "most"), "<="),
    (("more", "than"), ">"),
    (("less", "than"), "<"),
    (("higher", "than"), ">"),
    (("lower", "than"), "<"),
    (("greater", "than"), ">"),
    (("warmer", "than"), ">"),
    (("colder", "than"), "<"),
    (("above",), ">"),
    (("over",), ">"),
    (("exceeds",), ">"),
    (("exceeding",), ">"),
    (("below",), "<"),
    (("under",), "<"),
)
_TRENDS = {
    "rising": "rising", "increasing": "rising", "climbing": "rising", "growing": "rising",
    "falling": "falling", "dropping": "falling", "decreasing": "falling", "declining": "falling",
    "sinking": "falling", "steady": "steady", "stable": "steady", "constant": "steady",
    "unchanged": "steady", "flat": "steady",
}  # fmt: skip
_TREND_PHRASES = {("going", "up"): "rising", ("going", "down"): "falling"}
_RELATIONS = {">": lambda v, t: v > t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t}
_RELATIONS["<="] = lambda v, t: v <= t


@dataclass(frozen=True)
class Check:
    status: str  # passed | failed | skipped
    offending: tuple[str, ...] = ()

    def to_json(self) -> str | dict[str, list[str]]:
        return {FAILED: list(self.offending)} if self.status == FAILED else self.status


def _check(offending: list[str], applies: bool = True) -> Check:
    if not applies:
        return Check(SKIPPED)
    return Check(FAILED, tuple(dict.fromkeys(offending))) if offending else Check(PASSED)


@dataclass(frozen=True)
class Checks:
    numbers: Check
    units: Check
    verdicts: Check
    yes_no: Check
    sensors: Check

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[str]:
        """Names of the failed checks, in the order of CHECKS."""
        return [name for name in CHECKS if getattr(self, name).status == FAILED]

    def to_json(self) -> dict[str, str | dict[str, list[str]]]:
        return {name: getattr(self, name).to_json() for name in CHECKS}


# ------------------------------------------------------------------ numbers and units


@dataclass(frozen=True)
class _Candidate:
    value: float
    unit: str | None  # None: matches in any unit (numbers of the question, ages, windows)


def _equal(written: str, candidate: float) -> bool:
    """``written`` equals ``candidate`` at the precision written (rounding counts as equal)."""
    value, places = parse_number(written), decimals(written)
    return abs(round(candidate, places) - value) < 1e-9 or abs(candidate - value) < 1e-9


def _candidates(question: str, facts: Sequence[Fact], verdicts: Sequence[Verdict]) -> list[_Candidate]:
    out = [_Candidate(f.value, f.unit) for f in facts if f.value is not None]
    for v in verdicts:
        timeish = {x for x in (v.age_s, v.window_s) if x is not None}
        for x in v.figures():
            is_time = any(abs(x - t * k) < 1e-9 for t in timeish for k in (1, 1 / 60, 1 / 3600))
            out.append(_Candidate(x, None if is_time else v.unit))
    out += [_Candidate(t.value, None) for t in tokenize(question) if t.kind == "num"]
    return out


def _unit_after(tokens: Sequence[Token], i: int) -> str | None:
    if i + 1 < len(tokens):
        two = units.normalize(f"{tokens[i].text} {tokens[i + 1].text}")
        if two not in (None, ""):
            return two
    if i < len(tokens) and tokens[i].kind != "num" and tokens[i].text not in ("a", "in"):
        one = units.normalize(tokens[i].text)
        return one if one not in (None, "") else None
    return None


def _in_unit(c: _Candidate, unit: str) -> float | None:
    """The candidate expressed in ``unit``, None when it cannot be."""
    if c.unit is None:
        return c.value
    if unit == units.DEGREES:
        found = units.lookup(c.unit)
        return c.value if found is not None and found.dimension == "temperature" else None
    try:
        return units.convert(c.value, c.unit, unit)
    except units.UnitError:
        return None


def _numbers(text: str, cands: list[_Candidate]) -> tuple[list[str], list[str]]:
    tokens = tokenize(_LIST_MARKER.sub(lambda m: " " * len(m.group(0)), text))
    bad_numbers, bad_units = [], []
    for i, tok in enumerate(tokens):
        if tok.kind != "num":
            continue
        unit = _unit_after(tokens, i + 1)
        if unit is None:
            if not any(_equal(tok.text, c.value) for c in cands):
                bad_numbers.append(tok.text.lstrip("+"))
            continue
        converted = [_in_unit(c, unit) for c in cands]
        if any(x is not None and _equal(tok.text, x) for x in converted):
            continue
        if any(_equal(tok.text, c.value) for c in cands):
            bad_units.append(f"{tok.text} {unit}")
        else:
            bad_numbers.append(tok.text.lstrip("+"))
    return bad_numbers, bad_units


def _missing_figures(text: str, verdicts: Sequence[Verdict]) -> list[str]:
    """A computed Yes or No must come with its figures ("No: humidity is 68.6 %, not above
    80 %"): the reading of each verdict that decided it must be in the text, at any precision
    written. Without this "No, 1." passed every check (seen in the demo)."""
    tokens = tokenize(_LIST_MARKER.sub(lambda m: " " * len(m.group(0)), text))
    written = [(t.text, _unit_after(tokens, i + 1)) for i, t in enumerate(tokens) if t.kind == "num"]
    missing = []
    for v in verdicts:
        if v.answer is None or v.value is None or v.stale or v.kind == "trend":
            continue  # a trend's figure is a slope per minute: no one quotes it
        reading = _Candidate(v.value, v.unit or None)
        quoted = (
            (x := (reading.value if unit is None else _in_unit(reading, unit))) is not None and _equal(w, x)
            for w, unit in written
        )
        if not any(quoted):
            missing.append(f"missing {v.value:g}")
    return missing


# ------------------------------------------------------------------ verdict words


def _clauses(text: str) -> list[str]:
    return [c for c in _CLAUSE.split(text) if c.strip()]


def _negated(words: list[str], i: int) -> bool:
    """A negation before word ``i``: "no" right before (or before "real/big/serious"), another
    negation within three words, not across but/and/or."""
    j = i - 1
    if j >= 0 and words[j] in ("a", "any"):
        j -= 1
    if j >= 0 and words[j] in ("real", "big", "serious", "major"):
        j -= 1
    if j >= 0 and words[j] == "no":
        return True
    for k in range(i - 1, max(-1, i - 4), -1):
        if words[k] in _STOP:
            return False
        if words[k] != "no" and is_negation(words[k]):
            return True
    return False


def _start_of_claim(words: list[str], i: int) -> int:
    j = i
    while j > 0 and words[j - 1] in _ADVERBS:
        j -= 1
    return j


@dataclass(frozen=True)
class _Claim:
    text: str
    kind: str  # side | label | ok | not_ok | relation | trend
    what: str  # low/high, a label word, an op, a direction
    negated: bool
    number: float | None = None
    unit: str | None = None


def _band_claims(words: list[str], label_words: frozenset[str], dims: set[str]) -> list[_Claim]:
    out: list[_Claim] = []
    dim_words: dict[str, str] = {}
    for d in dims:
        dim_words.update(_DIMENSION_WORDS.get(d, {}))
    for i, w in enumerate(words):
        kind, what = "", ""
        enough = i + 1 < len(words) and words[i + 1] == "enough"
        if w in _HIGH or w in _LOW:  # before labels: a band labelled "low" is not the only low one
            kind, what = "side", "high" if w in _HIGH else "low"
        elif enough and w in dim_words:  # "cold enough" is about sides even where "cold" is a label word
            kind, what = "side", dim_words[w]
        elif w in label_words:
            kind, what = "label", w
        elif w in dim_words:
            kind, what = "side", dim_words[w]
        elif w in _OK:
            kind, what = "ok", w
        elif w in _NOT_OK:
            kind, what = "not_ok", w
        if not kind:
            continue
        start = _start_of_claim(words, i)
        neg = _negated(words, start)
        text = _negation_text(words, start, i) if neg else " ".join(words[start : i + 1])
        if kind == "side" and enough:  # "cold enough" claims "not too warm": the other side, negated
            what, neg, text = ("low" if what == "high" else "high"), not neg, f"{text} enough"
        out.append(_Claim(text, kind, what, neg))
    for p in _OK_PHRASES:
        for h in find_phrase(words, p, plural=False):
            out.append(_Claim(" ".join(p), "ok", "range", _negated(words, h)))
    return out


def _negation_text(words: list[str], start: int, end: int) -> str:
    k = start - 1
    while k > 0 and not (is_negation(words[k]) or words[k] == "no"):
        k -= 1
    return " ".join(words[max(k, 0) : end + 1])


def _relation_claims(tokens: list[Token]) -> list[_Claim]:
    words = [t.text for t in tokens]
    out = []
    for pattern, op in _CLAIM_OPS:
        for h in find_phrase(words, pattern, plural=False):
            j = h + len(pattern)
            if j < len(tokens) and words[j] == "the":
                j += 1
            if j >= len(tokens) or tokens[j].kind != "num":
                continue
            nxt = words[j + 1] if j + 1 < len(words) else ""
            if nxt in _TIME_WORDS:
                continue
            unit = _unit_after(tokens, j + 1)
            neg = _negated(words, h)
            text = " ".join(words[h : j + 1] + ([unit] if unit else []))
            out.append(_Claim(("not " if neg else "") + text, "relation", op, neg, tokens[j].value, unit))
    # "at or below 25" also contains "below 25": keep the longest claim at each number
    seen: set[tuple[float | None, str | None]] = set()
    kept = []
    for c in out:
        key = (c.number, c.unit)
        if key in seen:
            continue
        seen.add(key)
        kept.append(c)
    return kept


def _trend_claims(words: list[str]) -> list[_Claim]:
    out = [_Claim(w, "trend", _TRENDS[w], _negated(words, i)) for i, w in enumerate(words) if w in _TRENDS]
    for p, d in _TREND_PHRASES.items():
        out += [
            _Claim(" ".join(p), "trend", d, _negated(words, h)) for h in find_phrase(words, p, plural=False)
        ]
    return [_Claim(("not " if c.negated else "") + c.text, c.kind, c.what, c.negated) for c in out]


def _contradicts(c: _Claim, v: Verdict) -> bool | None:
    """True: contradiction; False: consistent; None: this verdict cannot judge the claim.
    About a stale or missing reading nothing can be said: any band, relation or trend claim
    (negated or not) contradicts its ``unknown`` verdict, and the template's "cannot say"
    replaces the text."""
    if v.verdict == UNKNOWN or v.value is None or v.stale:
        return True
    if c.kind == "trend":
        if v.direction is None:
            return None
        holds = v.direction == c.what
        return holds if c.negated else not holds
    if c.kind == "relation":
        assert c.number is not None
        threshold = c.number
        if c.unit is not None and c.unit != units.DEGREES:
            try:
                threshold = units.convert(c.number, c.unit, v.unit)
            except units.UnitError:
                return None
        if v.kind == "trend":
            return None
        holds = _RELATIONS[c.what](v.value, threshold)
        return holds if c.negated else not holds
    b = v.band_info
    if b is None:
        return None
    if c.kind == "label":
        holds = c.what in b.words
    elif c.kind == "side":
        if not b.ok and b.side is None:
            return None
        holds = b.side == c.what and not b.ok
    elif c.kind == "ok":
        holds = b.ok
    else:
        holds = not b.ok
    return holds if c.negated else not holds


def _mentioned(clause: str, picked: Sequence[SensorConfig]) -> set[str]:
    return {p.name for p in pick_sensors(clause, picked, all_words=False) if p.kind in (NAME, ALIAS)}


def _dimension(unit: str) -> str | None:
    found = units.lookup(unit) if unit else None
    return found.dimension if found else None


def _verdict_words(
    text: str,
    verdicts: Sequence[Verdict],
    meanings: Mapping[str, Meaning],
    picked: Sequence[SensorConfig],
) -> list[str]:
    judged = list(verdicts)  # unknown ones too: a claim about a stale reading is refused
    if not judged:
        return []
    by_name = {v.sensor: v for v in judged}
    label_words = frozenset(
        w
        for v in judged
        if v.sensor in meanings
        for b in meanings[v.sensor].bands
        if not b.ok
        for w in b.words
    ) - {"too"}
    label_words -= _OK
    offending: list[str] = []
    current = [v.sensor for v in judged]
    for clause in _clauses(text):
        named = _mentioned(clause, picked) & set(by_name)
        if named:
            current = sorted(named)
        targets = [by_name[n] for n in current if n in by_name]
        tokens = tokenize(clause)
        words = [t.text for t in tokens]
        dims = {d for v in targets if (d := _dimension(v.unit))}
        claims = _band_claims(words, label_words, dims) + _relation_claims(tokens) + _trend_claims(words)
        for claim in claims:
            if claim.kind == "label":
                relevant = [
                    v
                    for v in targets
                    if v.sensor in meanings and _has_label_word(meanings[v.sensor], claim.what)
                ]
            else:
                relevant = list(targets)
            results = [_contradicts(claim, v) for v in relevant]
            decided = [r for r in results if r is not None]
            if decided and all(decided):
                offending.append(claim.text)
    return offending


def _has_label_word(meaning: Meaning, word: str) -> bool:
    return any(word in b.words for b in meaning.bands if not b.ok)


# ------------------------------------------------------------------ yes/no and sensors


def _first_word(text: str) -> str:
    tokens = [t.text for t in tokenize(text) if t.kind == "word"]
    return tokens[0] if tokens else ""


def _yes_no(text: str, verdicts: Sequence[Verdict]) -> Check:
    asked = [v for v in verdicts if v.yes_no]
    if not asked:
        return Check(SKIPPED)
    first = _first_word(text)
    said = True if first in _YES else False if first in _NO else None
    expected = overall_answer(verdicts)
    if expected is not None:
        if said is expected:
            return Check(PASSED)
        return Check(FAILED, (f"missing {'Yes' if expected else 'No'}" if said is None else first,))
    if any(v.answer is None for v in asked):
        return Check(FAILED, (first,)) if said is not None else Check(PASSED)
    return Check(SKIPPED)


def _sensors(text: str, sensors: Sequence[SensorConfig], picked: Sequence[SensorConfig]) -> list[str]:
    asked = {s.name for s in picked}
    return [
        p.name
        for p in pick_sensors(text, sensors, all_words=False)
        if p.kind in (NAME, ALIAS) and p.name not in asked
    ]


def validate(
    text: str,
    *,
    question: str,
    facts: Sequence[Fact],
    verdicts: Sequence[Verdict],
    meanings: Mapping[str, Meaning] | None = None,
    sensors: Sequence[SensorConfig] = (),
    picked: Sequence[SensorConfig] = (),
) -> Checks:
    """All checks of ``text``; ``sensors`` are all configured ones, ``picked`` the question's."""
    bad_numbers, bad_units = _numbers(text, _candidates(question, facts, verdicts))
    return Checks(
        numbers=_check(bad_numbers + _missing_figures(text, verdicts)),
        units=_check(bad_units),
        verdicts=_check(_verdict_words(text, verdicts, meanings or {}, picked), applies=bool(verdicts)),
        yes_no=_yes_no(text, verdicts),
        sensors=_check(_sensors(text, sensors, picked), applies=bool(sensors)),
    )
