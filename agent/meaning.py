"""What a sensor's value means: labelled bands, a target, limits, a description.

Why: a 135M model quotes readings well but judges them badly (18.9 % soil moisture called
"high"). The judgement is a rule of the site, so it lives in the configuration and verdicts
are computed from it, never asked of the model.

Config forms (values in the sensor's own unit):

- A compact chain, lowest band first: ``"too_dry < 25 <= ok <= 60 < too_wet"``. Each edge sits
  between two labels and belongs to exactly one of them, the side with ``<=``:
  ``A < 25 <= B`` puts 25 in B (A is v < 25, B is v >= 25); ``A <= 25 < B`` puts 25 in A.
  ``A < e < B`` leaves e in no band (a gap) and ``A <= e <= B`` in both (an overlap): both are
  errors. The first band is open below and the last open above.
- A list of mappings, one per band: ``{label, below|to, above|from}``: ``below: x`` is v < x,
  ``to: x`` is v <= x, ``above: x`` is v > x, ``from: x`` is v >= x; a missing lower (upper)
  edge is open. The bands, sorted by their lower edge, must meet exactly: each edge in exactly
  one band (no gap, no overlap). Closed outer ends are allowed (``{label: ok, from: 0}``): a
  value outside every band then has no band.
- ``limits: {low: 25, high: 60}`` (or ``[25, 60]``) without bands means
  ``too_low < 25 <= ok <= 60 < too_high``; one side only is allowed.

Each band knows whether it is ok (label ``ok``, ``normal``, ``good``, ``fine``, ``in_range``)
and its side: bands below the ok band(s) are ``low``, above ``high``. Without an ok band the
side comes from the label's words (``dry``, ``low``, ``cold`` ... -> low; ``wet``, ``high``,
``hot`` ... -> high), else it is None. "Is it too low / too high / ok?" is answered from that.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OK_LABELS = frozenset({"ok", "normal", "good", "fine", "in_range"})
LOW_WORDS = frozenset({"low", "dry", "cold", "cool", "empty", "under", "min", "freezing", "flat"})
HIGH_WORDS = frozenset({"high", "wet", "hot", "warm", "full", "over", "max", "humid", "overheating"})
_LABEL = re.compile(r"[a-z][a-z0-9_]{0,39}")


class MeaningError(ValueError):
    """A sensor meaning that cannot be used; the message names the problem and the place."""


@dataclass(frozen=True)
class Band:
    """``low <(=) v <(=) high``; ``-inf``/``inf`` for an open end (then the flag is irrelevant)."""

    label: str
    low: float = -math.inf
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = True
    ok: bool = False
    side: str | None = None  # "low" | "high" | None (ok bands and unknown sides)

    def contains(self, value: float) -> bool:
        above = value > self.low or (self.low_inclusive and value == self.low)
        below = value < self.high or (self.high_inclusive and value == self.high)
        return above and below

    @property
    def words(self) -> tuple[str, ...]:
        """The label as words: ``too_dry`` -> ("too", "dry")."""
        return tuple(self.label.split("_"))

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "low": None if math.isinf(self.low) else self.low,
            "high": None if math.isinf(self.high) else self.high,
            "low_inclusive": self.low_inclusive,
            "high_inclusive": self.high_inclusive,
            "ok": self.ok,
            "side": self.side,
        }


@dataclass(frozen=True)
class Meaning:
    bands: tuple[Band, ...] = ()
    target: float | None = None
    limits: tuple[float | None, float | None] | None = None  # (low, high) as configured
    description: str = ""
    steady_per_min: float | None = None  # trend tolerance; see verdicts.py

    def band_of(self, value: float) -> Band | None:
        """The band holding ``value`` (None: no bands, or outside closed outer ends)."""
        return next((b for b in self.bands if b.contains(value)), None)

    def ok_range(self) -> tuple[float, float] | None:
        """(low, high) edges of the ok bands together, when there are ok bands."""
        oks = [b for b in self.bands if b.ok]
        return (oks[0].low, oks[-1].high) if oks else None

    def to_json(self) -> dict[str, Any]:
        return {
            "bands": [b.to_json() for b in self.bands],
            "target": self.target,
            "limits": list(self.limits) if self.limits else None,
            "description": self.description,
            "steady_per_min": self.steady_per_min,
        }


# ------------------------------------------------------------------ parsing


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MeaningError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise MeaningError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise MeaningError(f"{where}: {value!r} is not a finite number")
    return number


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MeaningError(f"{where}: empty label")
    label = value.strip().lower()
    if not _LABEL.fullmatch(label):
        raise MeaningError(
            f"{where}: label {value!r} must be a word of letters, digits and _ (e.g. too_dry, ok)"
        )
    return label


_CHAIN_TOKEN = re.compile(r"\s*(<=|<|[^\s<]+)")


def parse_chain(text: str, where: str = "bands") -> tuple[Band, ...]:
    """``"too_dry < 25 <= ok <= 60 < too_wet"`` -> bands (edge rules in the module docstring)."""
    parts = [m.group(1) for m in _CHAIN_TOKEN.finditer(text.strip())]
    if not parts:
        raise MeaningError(f"{where}: empty band chain")
    if len(parts) % 4 != 1:
        raise MeaningError(
            f"{where}: {text!r} must read label < number <= label ...: labels and edges alternate, "
            "each edge between '<' and '<=' (e.g. too_dry < 25 <= ok <= 60 < too_wet)"
        )
    labels = [_label(parts[i], f"{where}: band {i // 4 + 1}") for i in range(0, len(parts), 4)]
    edges: list[tuple[float, bool]] = []  # (edge, belongs to the band above)
    for i in range(1, len(parts), 4):
        left, raw, right = parts[i], parts[i + 1], parts[i + 2]
        if left not in ("<", "<=") or right not in ("<", "<="):
            raise MeaningError(f"{where}: expected '<' or '<=' around {raw!r}, got {left!r} and {right!r}")
        edge = _number(raw, f"{where}: edge {raw!r}")
        if left == "<" and right == "<":
            raise MeaningError(
                f"{where}: gap at {raw}: '< {raw} <' puts {raw} in no band (use <= on one side)"
            )
        if left == "<=" and right == "<=":
            raise MeaningError(f"{where}: overlap at {raw}: '<= {raw} <=' puts {raw} in two bands")
        edges.append((edge, left == "<"))
    for (a, _), (b, _) in itertools.pairwise(edges):
        if b <= a:
            raise MeaningError(f"{where}: edges must increase from left to right, got {a:g} then {b:g}")
    bands = []
    for i, label in enumerate(labels):
        low, low_inc = (edges[i - 1][0], edges[i - 1][1]) if i > 0 else (-math.inf, True)
        high, high_inc = (edges[i][0], not edges[i][1]) if i < len(edges) else (math.inf, True)
        bands.append(Band(label, low, high, low_inc, high_inc))
    return _finish(bands, where)


def _band_from_mapping(item: Any, where: str) -> Band:
    if not isinstance(item, Mapping):
        raise MeaningError(f"{where}: expected a mapping like {{label: ok, from: 25, to: 60}}, got {item!r}")
    unknown = sorted(set(item) - {"label", "below", "to", "above", "from"})
    if unknown:
        raise MeaningError(f"{where}: unknown keys {unknown} (use label, below, to, above, from)")
    label = _label(item.get("label"), where)
    if "above" in item and "from" in item:
        raise MeaningError(f"{where}: 'above' and 'from' both give the lower edge; keep one")
    if "below" in item and "to" in item:
        raise MeaningError(f"{where}: 'below' and 'to' both give the upper edge; keep one")
    low, low_inc = -math.inf, True
    if "above" in item:
        low, low_inc = _number(item["above"], f"{where}.above"), False
    elif "from" in item:
        low = _number(item["from"], f"{where}.from")
    high, high_inc = math.inf, True
    if "below" in item:
        high, high_inc = _number(item["below"], f"{where}.below"), False
    elif "to" in item:
        high = _number(item["to"], f"{where}.to")
    if high < low or (high == low and not (low_inc and high_inc)):
        raise MeaningError(f"{where}: band {label!r} is empty (lower edge {low:g}, upper edge {high:g})")
    return Band(label, low, high, low_inc, high_inc)


def parse_band_list(items: Sequence[Any], where: str = "bands") -> tuple[Band, ...]:
    """A list of ``{label, below|to, above|from}`` mappings -> bands, sorted and checked."""
    if not items:
        raise MeaningError(f"{where}: empty list of bands")
    bands = sorted(
        (_band_from_mapping(item, f"{where}[{i}]") for i, item in enumerate(items)),
        key=lambda b: (b.low, not b.low_inclusive),
    )
    for a, b in itertools.pairwise(bands):
        if math.isinf(a.high) or a.high > b.low:
            raise MeaningError(f"{where}: bands {a.label!r} and {b.label!r} overlap")
        if a.high < b.low:
            raise MeaningError(f"{where}: gap between {a.label!r} and {b.label!r} ({a.high:g} to {b.low:g})")
        if a.high_inclusive and b.low_inclusive:
            raise MeaningError(f"{where}: bands {a.label!r} and {b.label!r} overlap at {a.high:g}")
        if not a.high_inclusive and not b.low_inclusive:
            raise MeaningError(f"{where}: gap at {a.high:g}: neither {a.label!r} nor {b.label!r} holds it")
    return _finish(bands, where)


def _label_side(label: str) -> str | None:
    words = set(label.split("_"))
    low, high = bool(words & LOW_WORDS), bool(words & HIGH_WORDS)
    return "low" if low and not high else "high" if high and not low else None


def _finish(bands: list[Band], where: str) -> tuple[Band, ...]:
    """Labels unique, ok flags and sides assigned."""
    labels = [b.label for b in bands]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise MeaningError(f"{where}: label {dupes[0]!r} is used by more than one band")
    ok_at = [i for i, b in enumerate(bands) if b.label in OK_LABELS]
    if ok_at and ok_at != list(range(ok_at[0], ok_at[-1] + 1)):
        raise MeaningError(f"{where}: the ok bands must be next to each other")
    out = []
    for i, b in enumerate(bands):
        side = _label_side(b.label)
        if ok_at:
            side = None if i in ok_at else "low" if i < ok_at[0] else "high"
        out.append(Band(b.label, b.low, b.high, b.low_inclusive, b.high_inclusive, i in ok_at, side))
    return tuple(out)


def _limits(value: Any, where: str) -> tuple[float | None, float | None]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"low", "high"})
        if unknown:
            raise MeaningError(f"{where}: unknown keys {unknown} (use low, high)")
        raw_low, raw_high = value.get("low"), value.get("high")
    elif isinstance(value, list | tuple) and len(value) == 2:
        raw_low, raw_high = value
    else:
        raise MeaningError(f"{where}: expected {{low: x, high: y}} or [low, high], got {value!r}")
    low = None if raw_low is None else _number(raw_low, f"{where}.low")
    high = None if raw_high is None else _number(raw_high, f"{where}.high")
    if low is None and high is None:
        raise MeaningError(f"{where}: give low, high or both")
    if low is not None and high is not None and low >= high:
        raise MeaningError(f"{where}: low {low:g} must be below high {high:g}")
    return low, high


def _bands_from_limits(low: float | None, high: float | None) -> tuple[Band, ...]:
    bands = []
    if low is not None:
        bands.append(Band("too_low", high=low, high_inclusive=False))
    bands.append(Band("ok", -math.inf if low is None else low, math.inf if high is None else high))
    if high is not None:
        bands.append(Band("too_high", low=high, low_inclusive=False))
    return _finish(bands, "limits")


def parse_meaning(data: Mapping[str, Any] | str, where: str = "meaning") -> Meaning:
    """The config's ``meaning`` of a sensor: a band chain string, a band list, or a mapping with ``bands``
    (chain or list), ``target``, ``limits``, ``description``, ``steady_per_min``."""
    if isinstance(data, str):
        return Meaning(bands=parse_chain(data, f"{where}.bands"))
    if isinstance(data, list):
        return Meaning(bands=parse_band_list(data, f"{where}.bands"))
    if not isinstance(data, Mapping):
        raise MeaningError(f"{where}: expected a mapping, a band list or a band chain string, got {data!r}")
    unknown = sorted(set(data) - {"bands", "target", "limits", "description", "steady_per_min"})
    if unknown:
        raise MeaningError(f"{where}: unknown keys {unknown}")
    raw = data.get("bands")
    bands: tuple[Band, ...] = ()
    if isinstance(raw, str):
        bands = parse_chain(raw, f"{where}.bands")
    elif isinstance(raw, list):
        bands = parse_band_list(raw, f"{where}.bands")
    elif raw is not None:
        raise MeaningError(f"{where}.bands: expected a chain string or a list, got {raw!r}")
    limits = _limits(data["limits"], f"{where}.limits") if data.get("limits") is not None else None
    if limits and not bands:
        bands = _bands_from_limits(*limits)
    target = _number(data["target"], f"{where}.target") if data.get("target") is not None else None
    steady = None
    if data.get("steady_per_min") is not None:
        steady = _number(data["steady_per_min"], f"{where}.steady_per_min")
        if steady < 0:
            raise MeaningError(f"{where}.steady_per_min: must be zero or more, got {steady:g}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise MeaningError(f"{where}.description: expected a string")
    return Meaning(bands, target, limits, description.strip(), steady)
