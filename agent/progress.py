"""A progress line for the operator CLI while a device works on an answer.

A query can take many seconds before its first token (a queue, a long prompt, a slow board)
and, with ``--json`` or stdout redirected, shows nothing until the end. This writes one
self-overwriting line on stderr: the time waited and, once the answer streams, the chunks
received. It is drawn only when stderr is a terminal: scripts and logs that capture stderr get
no carriage returns, and their stderr keeps holding only the ``prog: error [code]`` line. When
the streamed answer itself is printed on a terminal, the text is the progress: the line is
cleared at the first chunk and not drawn again.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

_SPIN = "|/-\\"
_CLEAR = "\r\x1b[K"


class Progress:
    """Use as a context manager around the wait; call :meth:`chunk` for every chunk."""

    def __init__(self, label: str, stream: TextIO, *, enabled: bool, period_s: float = 0.25) -> None:
        self.label = label
        self.stream = stream
        self.enabled = enabled
        self.period_s = period_s
        self.chunks = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._drawn = False
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def chunk(self, text_shown: bool) -> None:
        """A chunk arrived. ``text_shown``: its text goes to the same terminal next, so the
        line gives way to it for good."""
        self.chunks += 1
        if text_shown:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._drawn:
                self.stream.write(_CLEAR)
                self.stream.flush()
                self._drawn = False

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        spin = _SPIN[int(elapsed / self.period_s) % len(_SPIN)]
        if self.chunks:
            return f"{spin} {self.label}: answering, {self.chunks} chunks in {elapsed:.1f} s"
        return f"{spin} {self.label}: waiting for the answer, {elapsed:.1f} s"

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            with self._lock:
                if self._stop.is_set():
                    return
                self.stream.write(_CLEAR + self.line())
                self.stream.flush()
                self._drawn = True
