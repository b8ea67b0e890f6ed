"""A rollout as text for the terminal (``edge-fleet rollout status``): one line per wave with
a bar and its counts, the halt in words. Pure: from the API's JSON document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fleet.rollouts import states

BAR = 30
DONE = (states.CONFIRMED, states.SKIPPED, states.EXPIRED, states.ABORTED)


def rollout_text(doc: dict[str, Any]) -> str:
    lines = [
        f"rollout {doc['id']}  {doc['target']}  [{doc['state']}]  selector: {doc.get('selector') or 'all'}"
        f"  waves: {doc.get('waves_spec')}",
        f"started {_when(doc['created_at'])} by {doc.get('created_by')}; deadline {_when(doc['deadline'])}",
    ]
    for wave in doc["waves"]:
        lines.append(_wave_line(wave, doc["current_wave"]))
    totals = ", ".join(f"{s} {n}" for s, n in doc["counts"].items())
    lines.append(f"devices: {totals or 'none'}")
    halt = doc.get("halt")
    if halt:
        shown = ", ".join(halt["devices"][:10]) + (" ..." if len(halt["devices"]) > 10 else "")
        lines.append(f"HALTED by rule {halt['rule']}: {halt['message']}")
        lines.append(f"  devices: {shown or '-'}")
        lines.append(f"  figures: {halt['figures']}")
        lines.append(f"  resume with: edge-fleet rollout resume {doc['id']} (accepts wave {halt['wave']})")
    return "\n".join(lines)


def _wave_line(wave: dict[str, Any], current: int) -> str:
    counts: dict[str, int] = wave["counts"]
    size = max(1, wave["size"])
    done = sum(counts.get(s, 0) for s in DONE)
    bad = sum(counts.get(s, 0) for s in states.FAILURES)
    filled = round(BAR * done / size)
    failed = min(BAR - filled, round(BAR * bad / size))
    bar = "#" * filled + "x" * failed + "." * (BAR - filled - failed)
    if wave["started_at"] is None:
        phase = "waiting"
    elif wave["completed_at"] is None:
        phase = "in progress"
    elif wave["soak_until"] and wave["soak_until"] > datetime.now(UTC).timestamp():
        phase = f"soaking until {_when(wave['soak_until'])}"
    else:
        phase = "done"
    marker = ">" if wave["index"] == current else " "
    detail = ", ".join(f"{s} {n}" for s, n in counts.items())
    return f"{marker} wave {wave['index']} [{bar}] {done}/{wave['size']} {phase}  ({detail})"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
