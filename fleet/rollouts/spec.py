"""What a fleet manager asks for: a target, the devices (a selector and named canaries), the
waves, the halt rules and the deadline. Parsing is pure and strict: a typo is an error with a
stable code, never a rollout to the wrong devices.

Waves are cumulative, over the devices the selector picks that are not canaries:
``1%,10%,50%,100%`` (each wave brings the total to that share, rounded up) or counts
``10,100,all``, or a mix. The last one must cover every device (``100%`` or ``all``). Named
canaries, when given, are wave 0, before the first listed wave.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fleet.rollouts.errors import RolloutError
from fleet.telemetry.selectors import MAX_SELECTOR_CHARS
from model_packs.layout import TargetError, parse_target

MAX_WAVES = 20
MAX_CANARIES = 100
_WAVE = re.compile(r"(?:(\d{1,3}(?:\.\d{1,3})?)%|(\d{1,7})|(all))")
_DEVICE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Rules:
    """When a wave halts the rollout, and how long each step may take.

    - ``max_failure_rate``: failed or rolled back over the wave's devices that got the
      instruction (0.1: more than one in ten halts it; checked as results come in, so a bad
      canary halts before it has even finished);
    - ``tokens_per_s_drop``, ``ttft_rise``, ``error_rate_rise``, ``validation_rise``: the
      inference metrics of a wave's updated devices after activation versus the same devices
      before (median over devices of each one's median; rates as absolute increases);
    - ``soak_s``: after a wave's last device settled, how long its metrics are watched before
      the next wave starts; ``min_samples``: metrics records a device needs on each side to be
      judged; ``baseline_s``: how far back before its instruction the "before" reaches;
    - ``response_timeout_s``: an instruction with no update event by then is ``failed``
      (``no_response``); ``confirm_timeout_s``: an ``activated`` device whose status never
      names the target is ``failed`` (``not_confirmed``);
    - ``deadline_s``: devices offline when their wave starts get the instruction when they
      return within this many seconds of the rollout's start, else ``expired``.
    """

    max_failure_rate: float = 0.1
    tokens_per_s_drop: float = 0.2
    ttft_rise: float = 0.5
    error_rate_rise: float = 0.05
    validation_rise: float = 0.05
    soak_s: float = 600.0
    min_samples: int = 2
    baseline_s: float = 3600.0
    response_timeout_s: float = 1800.0
    confirm_timeout_s: float = 900.0
    deadline_s: float = 7 * 86400.0

    @classmethod
    def from_json(cls, data: Any) -> Rules:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise RolloutError("bad_rules", "rules: an object")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise RolloutError("bad_rules", f"rules.{str(key)[:40]}: unknown; known: {', '.join(known)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RolloutError("bad_rules", f"rules.{key}: a number")
            values[key] = int(value) if key == "min_samples" else float(value)
        rules = cls(**values)
        rules.check()
        return rules

    def check(self) -> None:
        for name in ("max_failure_rate", "error_rate_rise", "validation_rise", "tokens_per_s_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise RolloutError("bad_rules", f"rules.{name}: between 0 and 1")
        if self.ttft_rise < 0 or self.min_samples < 1:
            raise RolloutError("bad_rules", "rules.ttft_rise >= 0 and rules.min_samples >= 1")
        for name in ("soak_s", "baseline_s", "response_timeout_s", "confirm_timeout_s", "deadline_s"):
            if not 0 <= getattr(self, name) <= 365 * 86400:
                raise RolloutError("bad_rules", f"rules.{name}: seconds, from 0 to a year")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WaveStep:
    """One listed wave: the cumulative share (``percent``) or count of non-canary devices."""

    percent: float | None = None
    count: int | None = None  # None with percent None: all

    def total(self, devices: int) -> int:
        if self.percent is not None:
            return min(devices, math.ceil(devices * self.percent / 100 - 1e-9))
        return devices if self.count is None else min(devices, self.count)


@dataclass(frozen=True)
class RolloutSpec:
    target: str  # NAME@VERSION
    selector: str | None = None
    waves: tuple[WaveStep, ...] = (WaveStep(percent=100.0),)
    canary: tuple[str, ...] = ()
    rules: Rules = field(default_factory=Rules)
    waves_text: str = "100%"

    @classmethod
    def from_json(cls, data: Any) -> RolloutSpec:
        """The API's request body: ``{"target", "selector", "waves", "canary", "rules"}``."""
        if not isinstance(data, dict):
            raise RolloutError("bad_request", "a JSON object")
        unknown = set(data) - {"target", "selector", "waves", "canary", "rules"}
        if unknown:
            raise RolloutError("bad_request", f"unknown fields: {', '.join(sorted(map(str, unknown)))[:200]}")
        target = data.get("target")
        if not isinstance(target, str):
            raise RolloutError("bad_target", "target: NAME@VERSION")
        try:
            parse_target(target)
        except TargetError as exc:
            raise RolloutError("bad_target", f"target: {exc}") from None
        selector = data.get("selector")
        if selector is not None and (not isinstance(selector, str) or len(selector) > MAX_SELECTOR_CHARS):
            raise RolloutError("bad_request", "selector: a string (see `edge-fleet devices --selector`)")
        waves_text = data.get("waves", "100%")
        if not isinstance(waves_text, str):
            raise RolloutError("bad_waves", "waves: e.g. '1%,10%,50%,100%' or '10,100,all'")
        return cls(
            target,
            selector or None,
            parse_waves(waves_text),
            parse_canary(data.get("canary", [])),
            Rules.from_json(data.get("rules")),
            waves_text,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "selector": self.selector,
            "waves": self.waves_text,
            "canary": list(self.canary),
            "rules": self.rules.to_json(),
        }


def parse_waves(text: str) -> tuple[WaveStep, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not 1 <= len(parts) <= MAX_WAVES:
        raise RolloutError("bad_waves", f"waves: 1 to {MAX_WAVES}, comma-separated")
    steps: list[WaveStep] = []
    for part in parts:
        match = _WAVE.fullmatch(part)
        if match is None:
            raise RolloutError("bad_waves", f"wave {part[:20]!r}: a percentage (10%), a count (50) or 'all'")
        pct, count, _ = match.groups()
        if pct is not None and not 0 < float(pct) <= 100:
            raise RolloutError("bad_waves", f"wave {part!r}: a percentage above 0 and at most 100")
        if count is not None and int(count) < 1:
            raise RolloutError("bad_waves", f"wave {part!r}: at least 1 device")
        steps.append(WaveStep(float(pct) if pct else None, int(count) if count else None))
    last = steps[-1]
    if not (last.count is None and (last.percent is None or last.percent == 100)):
        raise RolloutError("bad_waves", "the last wave must cover every device: 100% or all")
    return tuple(steps)


def parse_canary(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_CANARIES:
        raise RolloutError("bad_canary", f"canary: a list of at most {MAX_CANARIES} device ids")
    for item in value:
        if not isinstance(item, str) or not _DEVICE.fullmatch(item):
            raise RolloutError("bad_canary", f"canary: {str(item)[:70]!r} is not a device id")
    if len(set(value)) != len(value):
        raise RolloutError("bad_canary", "canary: a device is named twice")
    return tuple(value)
