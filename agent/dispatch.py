"""The dispatcher thread: inbound messages to the router, one at a time, and the systemd
watchdog, fed only while the answering worker is alive and no query hangs.

No message may stop it: a handler that raises is logged and counted, and the loop goes on.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable

import structlog

from agent.notify import Notifier
from agent.scheduling import Scheduler
from agent.transport import Inbound

log = structlog.get_logger("edge_agent")
HUNG_AFTER_DEADLINE_S = 30.0


class Dispatcher:
    def __init__(
        self,
        inbox: queue.Queue[Inbound],
        handle: Callable[[Inbound], None],
        notifier: Notifier,
        scheduler: Scheduler,
        worker: threading.Thread,
    ) -> None:
        self.inbox, self.handle, self.notifier = inbox, handle, notifier
        self.scheduler, self.worker = scheduler, worker
        self.failures = 0  # handler failures, reported by `cmd status`

    def run(self, stopping: threading.Event) -> None:
        next_tick = 0.0
        while not stopping.is_set():
            with contextlib.suppress(queue.Empty):
                self._one(self.inbox.get(timeout=0.5))
            now = time.monotonic()
            if now >= next_tick and self.worker_healthy(now):
                self.notifier.watchdog()
                next_tick = now + (self.notifier.watchdog_interval_s or 5.0)

    def _one(self, msg: Inbound) -> None:
        try:
            self.handle(msg)
        except Exception:  # no message may stop the dispatcher
            self.failures += 1
            log.exception("dispatch_failed", topic=msg.topic[:200])

    def worker_healthy(self, now: float) -> bool:
        """A dead worker, or a query running far past its deadline (a hung engine): stop
        feeding the watchdog, so systemd restarts the agent."""
        if not self.worker.is_alive():
            return False
        running = list(self.scheduler.running.values())
        return all(now < job.deadline + HUNG_AFTER_DEADLINE_S for job in running)
