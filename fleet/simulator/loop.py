"""One thread, one selector, many MQTT connections.

A thousand paho clients each with a network thread would be a thousand threads on a 2-core
box; instead paho's external-loop hooks (``on_socket_open`` / ``close`` /
``register_write`` / ``unregister_write``) register each client's socket here, and this loop
calls ``loop_read`` / ``loop_write`` when the socket is ready. Timers (telemetry ticks, update
steps, reconnects) run on the same thread, so a device's state is only ever touched by it:
no locks. Other threads talk to the loop only through :meth:`EventLoop.call` and
:meth:`EventLoop.call_soon_threadsafe`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

import structlog

log = structlog.get_logger("edge_fleet.simulator")
T = TypeVar("T")
MAX_WAIT_S = 1.0


class SocketOwner(Protocol):
    """What the loop calls when a watched socket is ready."""

    def on_readable(self) -> None: ...

    def on_writable(self) -> None: ...


class Timer:
    """A scheduled call; ``cancel`` makes it a no-op."""

    __slots__ = ("cancelled", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn, self.cancelled = fn, False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._calls_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0  # handler exceptions, logged and survived

    # ------------------------------------------------------------ sockets (loop thread)

    def watch(self, sock: Any, owner: SocketOwner) -> None:
        self._selector.register(sock, selectors.EVENT_READ, owner)

    def unwatch(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # never registered, or already closed
            self._selector.unregister(sock)

    def want_write(self, sock: Any, wanted: bool) -> None:
        try:
            key = self._selector.get_key(sock)
        except (KeyError, ValueError):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
        if key.events != events:
            self._selector.modify(sock, events, key.data)

    def watched(self, sock: Any) -> bool:
        try:
            self._selector.get_key(sock)
        except (KeyError, ValueError):
            return False
        return True

    # ------------------------------------------------------------ timers (loop thread)

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(fn)
        heapq.heappush(self._timers, (time.monotonic() + max(0.0, delay_s), next(self._order), timer))
        return timer

    # ------------------------------------------------------------ from any thread

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        with self._calls_lock:
            self._calls.append(fn)
        with contextlib.suppress(OSError):  # the wake-up socket is full: the loop is awake anyway
            self._wake_w.send(b"\0")

    def call(self, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """Run ``fn`` on the loop thread and return its result (directly when already on it,
        or when the loop is not running: then nothing else touches the devices)."""
        thread = self._thread
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return fn()
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.call_soon_threadsafe(run)
        return future.result(timeout_s)

    # ------------------------------------------------------------ running

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="fleet-simulator", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self.call_soon_threadsafe(lambda: None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._poll(self._wait_s())
            self._run_calls()
            self._run_timers()

    def _wait_s(self) -> float:
        if self._calls:
            return 0.0
        if not self._timers:
            return MAX_WAIT_S
        return min(MAX_WAIT_S, max(0.0, self._timers[0][0] - time.monotonic()))

    def _poll(self, timeout_s: float) -> None:
        for key, mask in self._selector.select(timeout_s):
            owner: SocketOwner | None = key.data
            if owner is None:
                self._drain_wakeups()
                continue
            if mask & selectors.EVENT_READ:
                self._guard(owner.on_readable)
            if mask & selectors.EVENT_WRITE and self.watched(key.fileobj):
                self._guard(owner.on_writable)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, deque()
        for fn in calls:
            self._guard(fn)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guard(timer.fn)

    def _guard(self, fn: Callable[[], None]) -> None:
        """A bug in one device's handler is logged and counted; the other devices go on."""
        try:
            fn()
        except Exception:
            self.errors += 1
            log.exception("simulator_handler_failed")
