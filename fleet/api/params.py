"""Query parameters -> values, each with a stable error code the API returns.

Times are Unix seconds (``1795948925``) or a duration back from now (``30m``, ``24h``,
``7d``); a step or window is a duration (``300``, ``5m``, ``1h``). Everything is bounded.
"""

from __future__ import annotations

import math
import re

from fleet.telemetry.queries import MAX_BUCKETS, QueryError

MAX_RANGE_S = 400 * 86_400  # the rollups' default retention
_DURATION = re.compile(r"(\d{1,9})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def duration(text: str, what: str) -> int:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise QueryError(f"bad_{what}", f"{what}: a duration such as 300, 5m, 24h or 7d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 1 <= seconds <= MAX_RANGE_S:
        raise QueryError(f"bad_{what}", f"{what}: 1 s to {MAX_RANGE_S // 86_400} days")
    return seconds


def instant(text: str | None, default: float, now: float, what: str) -> float:
    """Unix seconds (a number with a '.' or over 10 digits) or a duration ago."""
    if text is None:
        return default
    text = text.strip()
    try:
        if "." in text or len(text) >= 10:
            value = float(text)
            if not math.isfinite(value) or not 0 <= value <= 2**40:
                raise ValueError
            return value
    except ValueError:
        raise QueryError(f"bad_{what}", f"{what}: Unix seconds or a duration ago (24h)") from None
    return now - duration(text, what)


def time_range(
    since: str | None, until: str | None, step: str | None, now: float
) -> tuple[float, float, int]:
    """Defaults: the last 24 hours, about 100 buckets (a whole number of minutes)."""
    start = instant(since, now - 86_400, now, "since")
    end = instant(until, now, now, "until")
    if not start < end or end - start > MAX_RANGE_S:
        raise QueryError(
            "bad_range", f"since must be before until, at most {MAX_RANGE_S // 86_400} days apart"
        )
    size = duration(step, "step") if step is not None else max(60, math.ceil((end - start) / 6000) * 60)
    if (end - start) / size > MAX_BUCKETS:
        raise QueryError("bad_step", f"step: at most {MAX_BUCKETS} buckets in the range")
    return start, end, size
