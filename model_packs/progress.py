"""Progress for long steps: a live line on a terminal, a few log lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import structlog

log = structlog.get_logger("edge_slm.progress")


class StepProgress:
    """Callable ``(done, total)``; prints at most every 0.2 s and always the last one."""

    def __init__(self, step: str, stream: TextIO | None = None) -> None:
        self.step = step
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0
        self._last_pct = -1

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        pct = int(100 * done / total) if total else 100
        final = done >= total
        if not final and now - self._last < 0.2:
            return
        self._last = now
        if self.tty:
            end = "\n" if final else ""
            self.stream.write(f"\r[{self.step}] {pct:3d}% ({done}/{total}){end}")
            self.stream.flush()
        elif final or pct // 25 > self._last_pct // 25:
            self.stream.write(f"[{self.step}] {pct}% ({done}/{total})\n")
            self.stream.flush()
        self._last_pct = pct
        if final:
            log.info("step_done", step=self.step, seconds=round(now - self.start, 2))
