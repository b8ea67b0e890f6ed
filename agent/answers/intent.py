"""What a question asks of each picked sensor: a value, an aggregate, a comparison with a number,
a band ("too dry?", "a problem?", "should I water?") or a trend ("is it rising?").

Why: questions the agent can answer exactly must be recognised, so that the answer is computed
(verdicts.py) and the model only phrases it. Recognition is conservative: when unsure the
intent is a plain value and no verdict is guessed.

Rules:

- Yes/no shape: the first word (after "hey", "so", "please", "tell me" ...) of the question or
  of its last sentence is is, are, was, does, do, should, has, can, will, must, need ... A band
  or action ask needs that shape or "too" ("how hot is it?" is a value question, "is it too
  hot?" a band question).
- Comparison: an operator phrase right before a number, optionally followed by a unit:
  above/over/exceeds/more than/greater than/higher than/warmer than/hotter than/">" -> ``>``;
  below/under/less than/lower than/colder than/cooler than/"<" -> ``<``; at least/not below/
  no less than/">=" -> ``>=``; at most/not above/no more than/"<=" -> ``<=``. The threshold is
  converted to the sensor's unit; "degrees" alone means the sensor's own temperature unit; a
  unit of another dimension makes the intent unanswerable (``reason``).
- Aggregates: mean/average/avg, min/minimum/lowest, max/maximum/highest/peak. Window: "last /
  past / previous [N] second|minute|hour|day" ("the last hour", "past 10 minutes"), "today"
  (the last 24 h; the agent clips a window to the sensor's). A past-tense comparison with a
  window and no aggregate ("was the CO2 above 1000 ppm in the last hour?") compares the max
  (for > and >=) or the min (for < and <=).
- Bands: "problem", "issue", "concern", "alarm", "dangerous" -> not ok; "ok", "normal",
  "fine", "in range", "acceptable" -> ok; "high"/"low" -> that side (also when a band is
  labelled ``low``: an empty tank is low too); a word of one of the sensor's band labels ("dry"
  for ``too_dry``, "critical") -> those bands; else adjectives that fit the sensor's dimension
  (hot/warm/cold/cool/freezing for temperatures; dry/wet/humid/damp for shares; full/empty for
  levels) -> a side. "X enough" asks for "not the opposite side".
- Actions (yes/no with should/need/must/"time to"): water/irrigate, charge, refill/fill/top up,
  heat -> the low side; ventilate/open the vents/cool -> the high side.
- Trend: rising/increasing/climbing/going up; falling/dropping/decreasing/declining/going down;
  steady/stable/constant; "trend"/"changing" (no direction). Default window 15 min.
- Several sensors: an ask binds to the group of sensors named just before it (sensors named
  one after the other with no ask between form a group), or to the first group when it comes
  before every sensor ("what was the highest temperature and humidity?" -> both). When one
  sensor gets several asks, comparison beats band beats trend; an aggregate combines with any.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from agent import units
from agent.answers.picker import Pick
from agent.answers.text import Token, find_phrase, is_negation, tokenize
from agent.meaning import Meaning

VALUE, COMPARE, BAND, TREND = "value", "compare", "band", "trend"
TREND_WINDOW_S = 900.0

YES_NO_STARTS = frozenset(
    {
        "is", "are", "was", "were", "does", "do", "did", "should", "has", "have", "had", "can", "could",
        "will", "would", "must", "shall", "am", "need", "isn't", "aren't", "doesn't", "don't", "wasn't",
        "hasn't", "shouldn't", "won't", "didn't",
    }
)  # fmt: skip
_PREAMBLE = frozenset({"hey", "hi", "so", "ok", "okay", "please", "well", "tell", "me", "quick", "question"})
_PAST = frozenset({"was", "were", "did", "has", "have", "had", "wasn't", "didn't", "hasn't"})

_OPS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("no", "more", "than"), "<="),
    (("no", "less", "than"), ">="),
    (("not", "more", "than"), "<="),
    (("not", "less", "than"), ">="),
    (("not", "above"), "<="),
    (("not", "over"), "<="),
    (("not", "below"), ">="),
    (("not", "under"), ">="),
    (("at", "least"), ">="),
    (("at", "most"), "<="),
    (("more", "than"), ">"),
    (("greater", "than"), ">"),
    (("higher", "than"), ">"),
    (("warmer", "than"), ">"),
    (("hotter", "than"), ">"),
    (("bigger", "than"), ">"),
    (("larger", "than"), ">"),
    (("heavier", "than"), ">"),
    (("faster", "than"), ">"),
    (("less", "than"), "<"),
    (("lower", "than"), "<"),
    (("colder", "than"), "<"),
    (("cooler", "than"), "<"),
    (("smaller", "than"), "<"),
    (("lighter", "than"), "<"),
    (("slower", "than"), "<"),
    (("above",), ">"),
    (("over",), ">"),
    (("exceeds",), ">"),
    (("exceed",), ">"),
    (("exceeding",), ">"),
    (("below",), "<"),
    (("under",), "<"),
    ((">=",), ">="),
    (("≥",), ">="),
    (("<=",), "<="),
    (("≤",), "<="),
    ((">",), ">"),
    (("<",), "<"),
)

_AGGS = {
    "mean": "mean", "average": "mean", "avg": "mean",
    "min": "min", "minimum": "min", "lowest": "min", "coldest": "min",
    "max": "max", "maximum": "max", "highest": "max", "peak": "max", "hottest": "max", "warmest": "max",
}  # fmt: skip
_SPANS = {
    "second": 1.0, "seconds": 1.0, "sec": 1.0, "secs": 1.0, "s": 1.0,
    "minute": 60.0, "minutes": 60.0, "min": 60.0, "mins": 60.0,
    "hour": 3600.0, "hours": 3600.0, "h": 3600.0, "hr": 3600.0, "hrs": 3600.0,
    "day": 86400.0, "days": 86400.0,
}  # fmt: skip

_PROBLEM = frozenset({"problem", "problems", "issue", "issues", "concern", "worry", "alarm", "alarming"})
_PROBLEM |= frozenset({"dangerous", "danger", "bad", "wrong", "abnormal", "worrying", "unsafe"})
_OK = frozenset({"ok", "okay", "normal", "fine", "acceptable", "healthy", "good", "safe"})
_OK_PHRASES = (("in", "range"), ("within", "range"), ("in", "the", "normal", "range"))
_SIDE_ANY = {"high": "high", "low": "low"}
_SIDE_BY_DIMENSION = {
    "temperature": {"hot": "high", "warm": "high", "cold": "low", "cool": "low", "freezing": "low"},
    "share": {"dry": "low", "wet": "high", "humid": "high", "damp": "high", "full": "high", "empty": "low"},
    "length": {"full": "high", "empty": "low"},
    "volume": {"full": "high", "empty": "low"},
}
_TOO = {("too", "much"): "high", ("too", "little"): "low"}
_ACTION_WORDS = {
    "water": "low", "watering": "low", "irrigate": "low", "irrigation": "low", "charge": "low",
    "charging": "low", "recharge": "low", "refill": "low", "fill": "low", "heat": "low", "heating": "low",
    "heater": "low", "ventilate": "high", "ventilation": "high", "vent": "high", "vents": "high",
    "cool": "high", "cooling": "high",
}  # fmt: skip
_ACTION_CUES = frozenset({"should", "need", "needs", "must", "shouldn't", "ought"})
_TREND_WORDS = {
    "rising": "rising", "increasing": "rising", "climbing": "rising", "growing": "rising",
    "falling": "falling", "dropping": "falling", "decreasing": "falling", "declining": "falling",
    "sinking": "falling", "steady": "steady", "stable": "steady", "constant": "steady",
    "trend": None, "trending": None, "changing": "changing",
}  # fmt: skip
_TREND_PHRASES = {("going", "up"): "rising", ("going", "down"): "falling"}


@dataclass(frozen=True)
class Ask:
    """One thing the question asks, where it was asked (token index), as written."""

    kind: str  # agg | compare | band | action | trend
    position: int
    text: str
    agg: str | None = None
    op: str | None = None
    value: float | None = None
    unit: str | None = None  # normalised symbol, units.DEGREES, or None (no unit written)
    side: str | None = None  # low | high | ok | not_ok | not_low | not_high | word (see _band_for)
    word: str | None = None  # an adjective to match against band labels ("dry", "critical")
    direction: str | None = None  # rising | falling | steady | changing | None


@dataclass(frozen=True)
class Question:
    text: str
    tokens: tuple[Token, ...]
    yes_no: bool
    window_s: float | None
    window_text: str | None
    asks: tuple[Ask, ...]

    @property
    def numbers(self) -> tuple[str, ...]:
        return tuple(t.text for t in self.tokens if t.kind == "num")


@dataclass(frozen=True)
class Intent:
    """What to read for one sensor and what to decide about it (JSON: ``to_json``)."""

    sensor: str
    kind: str = VALUE  # value | compare | band | trend
    agg: str = "last"  # last | mean | min | max | trend: the fact to read
    window_s: float | None = None  # None: the sensor's window
    yes_no: bool = False  # the question wants a Yes or No for this sensor
    op: str | None = None  # compare: > >= < <=
    threshold: float | None = None  # compare: in the sensor's unit
    threshold_text: str | None = None  # compare: the number and unit as asked ("2.5 bar", "30")
    asked: str | None = None  # the words asked, as written ("2.5 bar", "too dry", "rising")
    side: str | None = None  # band: low | high | ok | not_ok | not_low | not_high
    labels: tuple[str, ...] = ()  # band: the band labels asked ("too_dry"), when a label word was used
    direction: str | None = None  # trend: rising | falling | steady | changing | None
    reason: str | None = None  # why no exact answer can be computed (then the verdict is unknown)

    def to_json(self) -> dict[str, object]:
        return {
            "sensor": self.sensor,
            "kind": self.kind,
            "agg": self.agg,
            "window_s": self.window_s,
            "yes_no": self.yes_no,
            "op": self.op,
            "threshold": self.threshold,
            "threshold_text": self.threshold_text,
            "asked": self.asked,
            "side": self.side,
            "labels": list(self.labels),
            "direction": self.direction,
            "reason": self.reason,
        }


# ------------------------------------------------------------------ the question


def _starts_yes_no(words: list[str]) -> bool:
    i = 0
    while i < len(words) and words[i] in _PREAMBLE:
        i += 1
    return i < len(words) and words[i] in YES_NO_STARTS


def _is_yes_no(question: str, words: list[str]) -> bool:
    """The question starts like a yes/no question, or its last sentence does ("The CO2 sensor
    is broken. Is the CO2 ok?")."""
    sentences = [s for s in re.split(r"[.!?;:\n]+(?!\d)", question) if s.strip()]
    last = [t.text for t in tokenize(sentences[-1])] if sentences else []
    return _starts_yes_no(words) or _starts_yes_no(last)


def _unit_at(tokens: Sequence[Token], i: int) -> tuple[str | None, int]:
    """The unit written at token ``i`` (two-token spellings first) and the tokens it used."""
    if i + 1 < len(tokens):
        two = f"{tokens[i].text} {tokens[i + 1].text}"
        if units.normalize(two) not in (None, ""):
            return units.normalize(two), 2
    if i < len(tokens) and tokens[i].kind != "num" and units.normalize(tokens[i].text) not in (None, ""):
        return units.normalize(tokens[i].text), 1
    return None, 0


def _comparisons(tokens: Sequence[Token], words: list[str]) -> list[Ask]:
    out: list[Ask] = []
    taken: set[int] = set()
    for pattern, op in _OPS:
        for start in find_phrase(words, pattern, plural=False):
            at = start + len(pattern)
            if start in taken or at >= len(tokens) or tokens[at].kind != "num":
                continue
            unit, used = _unit_at(tokens, at + 1)
            taken.update(range(start, at + 1))
            text = " ".join(words[start : at + 1 + used])
            out.append(Ask("compare", start, text, op=op, value=tokens[at].value, unit=unit))
    return out


def _window(words: list[str]) -> tuple[float | None, str | None]:
    if "today" in words:
        return 86400.0, "today"
    for i, w in enumerate(words):
        if w not in ("last", "past", "previous"):
            continue
        rest = words[i + 1 : i + 3]
        if rest and rest[0] in _SPANS:
            return _SPANS[rest[0]], " ".join(words[i : i + 2])
        if len(rest) == 2 and rest[1] in _SPANS:
            try:
                n = float(rest[0].replace(",", "."))
            except ValueError:
                continue
            if n > 0:
                return n * _SPANS[rest[1]], " ".join(words[i : i + 3])
    return None, None


_ADJECTIVES = frozenset(_SIDE_ANY) | frozenset(w for d in _SIDE_BY_DIMENSION.values() for w in d)


def _band_asks(words: list[str], gated: bool, label_words: frozenset[str]) -> list[Ask]:
    out: list[Ask] = []
    adjectives = _ADJECTIVES | label_words
    for i, w in enumerate(words):
        prev = words[i - 1] if i else ""
        # "isn't it too dry?" asks the same as "is it too dry?": a yes/no opener never negates
        negated = any(is_negation(x) and x not in YES_NO_STARTS for x in words[max(0, i - 3) : i])
        nxt = words[i + 1] if i + 1 < len(words) else ""
        too = prev == "too"
        if not (gated or too):
            continue
        text = f"too {w}" if too else w
        if (prev, w) in _TOO:
            out.append(Ask("band", i - 1, text, side=_TOO[(prev, w)]))
        elif w in _PROBLEM:
            out.append(Ask("band", i, text, side="ok" if negated else "not_ok"))
        elif w in _OK:
            out.append(Ask("band", i, text, side="not_ok" if negated else "ok"))
        elif w in adjectives:
            if nxt == "enough":
                out.append(Ask("band", i, f"{w} enough", side="enough", word=w))
            else:
                out.append(Ask("band", i, text, side="not" if negated else None, word=w))
    for p in _OK_PHRASES:
        out += [Ask("band", h, " ".join(p), side="ok") for h in find_phrase(words, p, plural=False) if gated]
    return out


def _actions(words: list[str], yes_no: bool) -> list[Ask]:
    cued = yes_no and (bool(_ACTION_CUES & set(words)) or find_phrase(words, ("time", "to"), plural=False))
    if not cued:
        return []
    out = []
    for i, w in enumerate(words):
        if w in _ACTION_WORDS:
            out.append(Ask("action", i, w, side=_ACTION_WORDS[w]))
    return out[:1]


def _trends(words: list[str]) -> list[Ask]:
    out = [Ask("trend", i, w, direction=_TREND_WORDS[w]) for i, w in enumerate(words) if w in _TREND_WORDS]
    for p, d in _TREND_PHRASES.items():
        out += [Ask("trend", h, " ".join(p), direction=d) for h in find_phrase(words, p, plural=False)]
    return out


def parse_question(question: str, label_words: frozenset[str] = frozenset()) -> Question:
    """Everything the question asks, before knowing which sensors it is about; ``label_words``
    are the words of the configured band labels ("dry", "critical"), see ``label_words()``."""
    tokens = tokenize(question)
    words = [t.text for t in tokens]
    yes_no = _is_yes_no(question, words)
    window_s, window_text = _window(words)
    compares = _comparisons(tokens, words)
    used = {i for a in compares for i in range(a.position, a.position + len(a.text.split()))}
    aggs = [Ask("agg", i, w, agg=_AGGS[w]) for i, w in enumerate(words) if w in _AGGS and i not in used]
    actions = _actions(words, yes_no)
    trends = _trends(words)
    skip = used | {a.position for a in actions + trends + aggs}
    bands = [a for a in _band_asks(words, yes_no, label_words) if a.position not in skip]
    asks = sorted(compares + aggs + actions + trends + bands, key=lambda a: a.position)
    return Question(question, tuple(tokens), yes_no, window_s, window_text, tuple(asks))


# ------------------------------------------------------------------ per sensor


def _groups(picks: Sequence[Pick], asks: Sequence[Ask]) -> list[list[Pick]]:
    ordered = sorted(picks, key=lambda p: p.position)
    groups: list[list[Pick]] = []
    for p in ordered:
        if groups and not any(groups[-1][-1].position < a.position < p.position for a in asks):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _bind(picks: Sequence[Pick], asks: Sequence[Ask]) -> dict[str, list[Ask]]:
    groups = _groups(picks, asks)
    bound: dict[str, list[Ask]] = {p.name: [] for p in picks}
    for a in asks:
        before = [g for g in groups if g[0].position <= a.position]
        group = before[-1] if before else groups[0]
        for p in group:
            bound[p.name].append(a)
    return bound


def _dimension(unit: str) -> str | None:
    found = units.lookup(unit) if unit else None
    return found.dimension if found else None


def _threshold(ask: Ask, pick: Pick) -> tuple[float | None, str | None]:
    """The threshold in the sensor's unit, or the reason it cannot be."""
    assert ask.value is not None
    sensor_unit = pick.sensor.unit
    if ask.unit is None:
        return ask.value, None
    if ask.unit == units.DEGREES:
        if _dimension(sensor_unit) == "temperature":
            return ask.value, None
        return (
            None,
            f"{ask.text!r}: degrees cannot be compared with {pick.name} in {sensor_unit or 'no unit'}",
        )
    try:
        return units.convert(ask.value, ask.unit, sensor_unit), None
    except units.UnitError as exc:
        return None, f"{ask.text!r} cannot be compared with {pick.name} in {sensor_unit or 'no unit'}: {exc}"


def _threshold_text(ask: Ask) -> str:
    words = ask.text.split()
    number = next(w for w in words if w[:1].isdigit() or w[:1] in "+-\u2212")
    return number if ask.unit in (None, units.DEGREES) else f"{number} {ask.unit}"


def _band_ask(ask: Ask, pick: Pick, meaning: Meaning | None) -> Intent | None:
    """The band intent for an ask, None when the ask does not apply to this sensor."""
    if meaning is None or not meaning.bands:
        if ask.kind == "action" or ask.side in ("ok", "not_ok") or ask.word in _SIDE_ANY:
            return Intent(pick.name, BAND, asked=ask.text, side=ask.side, reason=f"no bands for {pick.name}")
        return None
    if ask.kind == "action" or ask.word is None:
        return Intent(pick.name, BAND, asked=ask.text, side=ask.side)
    # "low"/"high" always ask for the side ("is the tank low?" is yes when it is empty too)
    labels = (
        ()
        if ask.word in _SIDE_ANY
        else tuple(b.label for b in meaning.bands if ask.word in b.words and not b.ok)
    )
    side = _SIDE_ANY.get(ask.word) or _SIDE_BY_DIMENSION.get(_dimension(pick.sensor.unit) or "", {}).get(
        ask.word
    )
    if ask.side == "enough":
        if side is None:
            return None
        return Intent(pick.name, BAND, asked=ask.text, side="not_high" if side == "low" else "not_low")
    if labels:
        return Intent(
            pick.name, BAND, asked=ask.text, labels=labels, side="not" if ask.side == "not" else None
        )
    if side is None:
        return None
    return Intent(pick.name, BAND, asked=ask.text, side=f"not_{side}" if ask.side == "not" else side)


def _intent(pick: Pick, asks: list[Ask], q: Question, meaning: Meaning | None) -> Intent:
    agg = next((a.agg for a in asks if a.kind == "agg" and a.agg), None)
    base = Intent(pick.name, VALUE, agg or "last", q.window_s if agg else None)
    compare = next((a for a in asks if a.kind == "compare"), None)
    if compare is not None:
        threshold, reason = _threshold(compare, pick)
        cagg = agg
        if cagg is None and q.window_s and q.tokens and q.tokens[0].text in _PAST:
            cagg = "max" if compare.op in (">", ">=") else "min"
        return replace(
            base,
            kind=COMPARE,
            agg=cagg or "last",
            window_s=q.window_s if cagg else None,
            yes_no=q.yes_no,
            op=compare.op,
            threshold=threshold,
            threshold_text=_threshold_text(compare),
            asked=compare.text,
            reason=reason,
        )
    for a in asks:
        if a.kind in ("band", "action"):
            found = _band_ask(a, pick, meaning)
            if found is not None:
                return replace(base, kind=BAND, yes_no=q.yes_no, asked=found.asked, side=found.side,
                               labels=found.labels, reason=found.reason)  # fmt: skip
    trend = next((a for a in asks if a.kind == "trend"), None)
    if trend is not None:
        return replace(
            base,
            kind=TREND,
            agg="trend",
            window_s=q.window_s or TREND_WINDOW_S,
            yes_no=q.yes_no and trend.direction is not None,
            asked=trend.text,
            direction=trend.direction,
        )
    return base


def label_words(meanings: Mapping[str, Meaning]) -> frozenset[str]:
    """Words of the non-ok band labels ("too_dry" -> "dry"; "too" is not one)."""
    return frozenset(w for m in meanings.values() for b in m.bands if not b.ok for w in b.words) - {"too"}


def intents_for(
    question: str | Question, picks: Sequence[Pick], meanings: Mapping[str, Meaning]
) -> list[Intent]:
    """One intent per pick, in the picks' order (a ``str`` is parsed with the meanings' label words)."""
    q = question if isinstance(question, Question) else parse_question(question, label_words(meanings))
    bound = _bind(picks, q.asks) if picks else {}
    return [_intent(p, bound[p.name], q, meanings.get(p.name)) for p in picks]
