"""Picking the number out of what a real sensor gives: a line of a sysfs file, a word of a
command's output, a field deep in a JSON payload.

Devices rarely publish a bare number. A DS18B20's ``w1_slave`` holds two lines and the reading
is valid only when the first ends in ``YES`` (``pattern``); ``i2cget`` prints hex (``0x1b``);
Zigbee2MQTT and Tasmota publish one JSON object for several quantities (``json_path``). This
module only extracts: no IO, no windows. A miss is a NoNumber with a short stable ``reason``
(counted per sensor like every bad reading), never a guess: a pattern that does not match is
``no_match`` (a failed CRC must not become a reading), an absent field ``no_field``.
"""

from __future__ import annotations

import json
import re

MAX_TEXT = 4096  # bytes read from a file source: a w1_slave is 75, a sysfs value a few


class NoNumber(ValueError):
    """The text or payload holds no usable number; ``reason`` is ``not_a_number``,
    ``no_match`` or ``no_field``."""

    def __init__(self, message: str, reason: str = "not_a_number") -> None:
        super().__init__(message)
        self.reason = reason


def path_parts(path: str) -> list[str | int]:
    """``"BME280.Temperature"`` -> ``["BME280", "Temperature"]``; a part of digits is a list
    index (``"sensors.0.value"``). Raises ValueError for an empty part."""
    parts: list[str | int] = []
    for part in path.split("."):
        if not part:
            raise ValueError(f"json path {path!r} has an empty part (keys are separated by one '.')")
        parts.append(int(part) if part.isdigit() else part)
    return parts


def pick(data: object, path: str) -> object:
    """The value at ``path`` inside parsed JSON; NoNumber(``no_field``) where a step is absent."""
    node = data
    for part in path_parts(path):
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and str(part) in node:
            node = node[str(part)]
        else:
            raise NoNumber(f"no {path!r} in the payload (stopped at {str(part)!r})", "no_field")
    return node


def number(word: str) -> float:
    """A decimal number (``21.437``, ``-5``, ``1e3``) or a hex integer as i2cget prints it
    (``0x1b``)."""
    word = word.strip()
    try:
        if word[:2].lower() == "0x":
            return float(int(word, 16))
        return float(word)
    except ValueError:
        raise NoNumber(f"not a number: {word[:40]!r}") from None


def text_number(text: str, pattern: str | None = None, json_path: str | None = None) -> float:
    """The number in a file's or command's text: the first group of ``pattern`` (or its whole
    match) when given; else the value at ``json_path`` when the text is JSON; else the first word."""
    if pattern is not None:
        m = re.search(pattern, text, re.MULTILINE)
        if m is None:
            raise NoNumber(f"pattern {pattern!r} does not match {text[:60]!r}", "no_match")
        return number(m.group(1) if m.re.groups else m.group(0))
    if json_path is not None:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise NoNumber(f"output is not JSON: {text[:40]!r}") from None
        value = pick(data, json_path)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise NoNumber(f"{json_path!r} is not a number: {str(value)[:40]!r}")
        return value if isinstance(value, float) else number(str(value))
    words = text.split()
    if not words:
        raise NoNumber("output is empty")
    return number(words[0])
