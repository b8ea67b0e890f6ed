"""Units: the spellings people and sensors use, normalised, and exact conversions between them.

Why: a sensor payload may carry its own unit (``{"value": 99.9, "unit": "lb"}`` for a sensor
configured in kg), and a question may name a threshold in another unit than the sensor's
("below 2.5 bar" for a pressure in kPa, "warmer than 0 °F"). Both must be converted exactly or
refused, never taken as they come.

A unit is a canonical symbol (``°C``, ``kPa``, ``µg/m³`` ...), a dimension, and an affine map
to the dimension's base unit: ``base = value * scale + offset``. Units convert only within one
dimension; ``%`` (a share: relative humidity, soil moisture, a fill level) and ``ppm``/``ppb``
(a concentration) are kept apart on purpose: 1 % of relative humidity is not 10000 ppm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class UnitError(ValueError):
    """Base of the unit errors; the message names the units involved."""


class UnknownUnit(UnitError):
    """A unit spelling that is not in the table."""


class UnitMismatch(UnitError):
    """Two known units of different dimensions (``%`` and ``°C``): no conversion exists."""


@dataclass(frozen=True)
class Unit:
    symbol: str
    dimension: str
    scale: float = 1.0
    offset: float = 0.0


_UNITS: tuple[tuple[Unit, tuple[str, ...]], ...] = (
    (Unit("°C", "temperature", 1.0, 273.15), ("°c", "c", "degc", "deg c", "celsius", "degrees celsius", "℃")),
    (
        Unit("°F", "temperature", 5 / 9, 273.15 - 32 * 5 / 9),
        ("°f", "f", "degf", "deg f", "fahrenheit", "degrees fahrenheit", "℉"),
    ),
    (Unit("K", "temperature"), ("k", "kelvin")),
    (Unit("%", "share"), ("%", "%rh", "rh", "percent", "pct", "per cent")),
    (Unit("ppm", "concentration", 1e-6), ("ppm",)),
    (Unit("ppb", "concentration", 1e-9), ("ppb",)),
    (Unit("µg/m³", "mass_concentration", 1e-9), ("µg/m³", "µg/m3", "ug/m3", "ug/m³", "μg/m³", "μg/m3")),
    (Unit("mg/m³", "mass_concentration", 1e-6), ("mg/m³", "mg/m3")),
    (Unit("Pa", "pressure"), ("pa", "pascal", "pascals")),
    (Unit("hPa", "pressure", 100.0), ("hpa", "hectopascal", "hectopascals")),
    (Unit("kPa", "pressure", 1000.0), ("kpa", "kilopascal", "kilopascals")),
    (Unit("MPa", "pressure", 1e6), ("mpa", "megapascal", "megapascals")),
    (Unit("bar", "pressure", 1e5), ("bar", "bars")),
    (Unit("mbar", "pressure", 100.0), ("mbar", "millibar", "millibars")),
    (Unit("psi", "pressure", 6894.757293168361), ("psi",)),
    (Unit("kg", "mass"), ("kg", "kilogram", "kilograms", "kilo", "kilos")),
    (Unit("g", "mass", 1e-3), ("g", "gram", "grams")),
    (Unit("mg", "mass", 1e-6), ("mg", "milligram", "milligrams")),
    (Unit("t", "mass", 1000.0), ("tonne", "tonnes")),
    (Unit("lb", "mass", 0.45359237), ("lb", "lbs", "pound", "pounds")),
    (Unit("oz", "mass", 0.028349523125), ("oz", "ounce", "ounces")),
    (Unit("m", "length"), ("m", "metre", "metres", "meter", "meters")),
    (Unit("cm", "length", 0.01), ("cm", "centimetre", "centimetres", "centimeter", "centimeters")),
    (Unit("mm", "length", 0.001), ("mm", "millimetre", "millimetres", "millimeter", "millimeters")),
    (Unit("km", "length", 1000.0), ("km", "kilometre", "kilometres", "kilometer", "kilometers")),
    (Unit("in", "length", 0.0254), ("inch", "inches")),
    (Unit("ft", "length", 0.3048), ("ft", "foot", "feet")),
    (Unit("V", "voltage"), ("v", "volt", "volts")),
    (Unit("mV", "voltage", 1e-3), ("mv", "millivolt", "millivolts")),
    (Unit("A", "current"), ("amp", "amps", "ampere", "amperes")),
    (Unit("mA", "current", 1e-3), ("ma", "milliamp", "milliamps", "milliampere", "milliamperes")),
    (Unit("W", "power"), ("w", "watt", "watts")),
    (Unit("kW", "power", 1000.0), ("kw", "kilowatt", "kilowatts")),
    (Unit("Wh", "energy"), ("wh",)),
    (Unit("kWh", "energy", 1000.0), ("kwh",)),
    (Unit("L", "volume"), ("l", "litre", "litres", "liter", "liters")),
    (Unit("mL", "volume", 1e-3), ("ml", "millilitre", "millilitres", "milliliter", "milliliters")),
    (Unit("m³", "volume", 1000.0), ("m³", "m3", "cubic metre", "cubic metres", "cubic meters")),
    (Unit("gal", "volume", 3.785411784), ("gal", "gallon", "gallons")),
    (Unit("lux", "illuminance"), ("lux", "lx")),
    (Unit("rpm", "frequency", 1 / 60), ("rpm",)),
    (Unit("Hz", "frequency"), ("hz", "hertz")),
    (Unit("dB", "level"), ("db", "decibel", "decibels")),
    (Unit("pH", "ph"), ("ph",)),
)

_BY_SPELLING: dict[str, Unit] = {}
_NOT_SPELLINGS = frozenset({"a", "t", "in"})  # symbols that are English words when lower-cased
for _unit, _spellings in _UNITS:
    for _s in {_unit.symbol.lower()} - _NOT_SPELLINGS | set(_spellings):
        _BY_SPELLING[_s] = _unit

# Spellings accepted only exactly as written: a lone "A" is an ampere, a lone "a" is English.
_CASE_SENSITIVE = {"A": "amp"}

# "degrees" alone names no scale: it means the sensor's own temperature unit (see intent.py).
DEGREES = "°"
_DEGREE_SPELLINGS = frozenset({"°", "deg", "degree", "degrees"})


def lookup(text: str) -> Unit | None:
    """The unit a spelling names (``"degC"``, ``"celsius"``, ``"%RH"``, ``"kPa"``), else None."""
    stripped = " ".join(text.strip().split())
    if stripped in _CASE_SENSITIVE:
        return _BY_SPELLING[_CASE_SENSITIVE[stripped]]
    return _BY_SPELLING.get(stripped.lower())


def normalize(text: str) -> str | None:
    """The canonical symbol of a unit spelling, ``°`` for a bare "degrees", else None.

    An empty string stays empty: a sensor configured without a unit has none."""
    if text.strip() == "":
        return ""
    if text.strip().lower() in _DEGREE_SPELLINGS:
        return DEGREES
    unit = lookup(text)
    return unit.symbol if unit else None


def is_unit(text: str) -> bool:
    """True when ``text`` is a known unit spelling (bare "degrees" included)."""
    return normalize(text) not in (None, "")


def _known(text: str) -> Unit:
    unit = lookup(text)
    if unit is None:
        raise UnknownUnit(f"unknown unit {text!r}")
    return unit


def compatible(a: str, b: str) -> bool:
    """True when both are known units of one dimension (or the same spelling, known or not)."""
    if normalize(a) == normalize(b) and normalize(a) is not None:
        return True
    ua, ub = lookup(a), lookup(b)
    return ua is not None and ub is not None and ua.dimension == ub.dimension


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit``.

    Equal spellings (after normalisation, e.g. "C" and "°C") return the value unchanged, even
    for units the table does not know; otherwise both must be known (UnknownUnit) and of one
    dimension (UnitMismatch). Non-finite values are refused: they are never a reading."""
    if not math.isfinite(value):
        raise UnitError(f"{value!r} is not a finite number")
    same = normalize(from_unit) == normalize(to_unit) and normalize(from_unit) is not None
    if same or from_unit.strip() == to_unit.strip():
        return value
    src, dst = _known(from_unit), _known(to_unit)
    if src.dimension != dst.dimension:
        raise UnitMismatch(
            f"{src.symbol} ({src.dimension}) cannot be converted to {dst.symbol} ({dst.dimension})"
        )
    base = value * src.scale + src.offset
    return (base - dst.offset) / dst.scale


def convert_reading(value: float, payload_unit: str | None, sensor_unit: str) -> float:
    """A payload's value in the sensor's configured unit; no payload unit means the sensor's.

    Raises UnknownUnit or UnitMismatch with a message that can be counted and logged as the
    reason the reading was refused."""
    if payload_unit is None or payload_unit.strip() == "":
        return value
    return convert(value, payload_unit, sensor_unit)
