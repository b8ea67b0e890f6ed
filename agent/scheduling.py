"""Bounded request queue with per-client fairness, rate limits, deadlines and cancel.

One engine serves one query at a time. Clients take turns (round-robin over clients
with queued work), so one client's flood waits behind its own requests, not everyone's.
Every rejection is an error the caller turns into a reply at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import Limits
from agent.errors import QueueFull, RateLimited
from agent.messages import QueryRequest, ReplyTo


@dataclass
class Job:
    query: QueryRequest
    client: str
    reply: ReplyTo
    received: float
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def id(self) -> str:
        return self.query.id


class RateLimiter:
    """Token bucket per client: ``per_s`` refill, ``burst`` capacity."""

    def __init__(self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.burst, self._clock = per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.per_s)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                raise RateLimited(
                    f"client {client!r} is over {self.per_s:g} requests/s (burst {self.burst})",
                    limit=self.burst,
                )
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # forget idle clients, bounded memory
                self._buckets.pop(next(iter(self._buckets)))


class Scheduler:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()
        self._cond = threading.Condition()
        self.running: dict[str, Job] = {}
        self._size = 0

    @property
    def depth(self) -> int:
        return self._size

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._size >= self.limits.queue_size:
                raise QueueFull(
                    f"the queue holds {self.limits.queue_size} requests and is full",
                    limit=self.limits.queue_size,
                )
            q = self._queues.setdefault(job.client, deque())
            if len(q) >= self.limits.per_client_queue:
                raise QueueFull(
                    f"client {job.client!r} already has {len(q)} queued requests",
                    limit=self.limits.per_client_queue,
                )
            q.append(job)
            self._size += 1
            self._cond.notify()

    def next(self, timeout_s: float) -> Job | None:
        """The next job, taking clients in turn; None if nothing came within the timeout."""
        with self._cond:
            if not self._size and not self._cond.wait_for(lambda: self._size > 0, timeout_s):
                return None
            client, q = next(iter(self._queues.items()))
            job = q.popleft()
            self._size -= 1
            del self._queues[client]
            if q:
                self._queues[client] = q  # back of the line
            self.running[job.id] = job
            return job

    def done(self, job: Job) -> None:
        with self._cond:
            self.running.pop(job.id, None)

    def cancel(self, target_id: str) -> tuple[str, Job] | None:
        """Remove a queued job (returned so its owner gets a reply) or flag a running one."""
        with self._cond:
            if target_id in self.running:
                job = self.running[target_id]
                job.cancel.set()
                return "running", job
            for client, q in self._queues.items():
                for job in q:
                    if job.id == target_id:
                        q.remove(job)
                        self._size -= 1
                        if not q:
                            del self._queues[client]
                        return "queued", job
        return None

    def drain(self) -> list[Job]:
        """Everything still queued (at shutdown every accepted request gets a reply)."""
        with self._cond:
            jobs = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._size = 0
            return jobs
