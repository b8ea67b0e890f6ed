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
from agent.journal import RequestJournal
from agent.messages import QueryRequest, ReplyTo


@dataclass
class Job:
    query: QueryRequest
    client: str
    reply: ReplyTo
    received: float
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    owner: str = ""  # the client key as sent (``client`` may become the shared overflow key)
    journal_no: int = 0  # its entry in the request journal, marked done with the last reply

    def __post_init__(self) -> None:
        self.owner = self.owner or self.client

    @property
    def id(self) -> str:
        return self.query.id


OVERFLOW = "*"  # the one bucket and queue that client keys beyond the cap share


class RateLimiter:
    """Token bucket per client key: ``per_s`` refill, ``burst`` capacity.

    A key is a label anyone can claim, so inventing a fresh key per request must not buy a
    fresh bucket: once ``max_keys`` keys hold partly used buckets, every new key shares one
    overflow bucket. A bucket that has refilled (an idle key) is forgotten first.
    """

    def __init__(
        self, per_s: float, burst: int, max_keys: int = 16, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_s, self.burst, self.max_keys, self._clock = per_s, burst, max_keys, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.per_s)

    def _key(self, client: str, now: float) -> str:
        if client in self._buckets or len(self._buckets) < self.max_keys:
            return client
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]  # refilled: nothing to remember
        return client if len(self._buckets) < self.max_keys else OVERFLOW

    def take(self, client: str) -> None:
        now = self._clock()
        with self._lock:
            key = self._key(client, now)
            tokens = self._level(key, now)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                shared = " (new client keys share one bucket past the cap)" if key == OVERFLOW else ""
                raise RateLimited(
                    f"client {client!r} is over {self.per_s:g} requests/s (burst {self.burst}){shared}",
                    limit=self.burst,
                )
            self._buckets[key] = (tokens - 1.0, now)


class Scheduler:
    def __init__(
        self,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        journal: RequestJournal | None = None,
    ) -> None:
        self.limits = limits
        self.journal = journal  # accepted queries survive a crash as `interrupted` replies
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
            if job.client not in self._queues and len(self._queues) >= self.limits.max_client_keys:
                job.client = OVERFLOW  # fresh keys past the cap share one queue share
            q = self._queues.setdefault(job.client, deque())
            if len(q) >= self.limits.per_client_queue:
                raise QueueFull(
                    f"client {job.client!r} already has {len(q)} queued requests",
                    limit=self.limits.per_client_queue,
                )
            if self.journal is not None:
                job.journal_no = self.journal.accepted(job.id, job.reply)
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
        """The job's last reply was handed to the transport."""
        with self._cond:
            self.running.pop(job.id, None)
            self._journal_done(job)

    def _journal_done(self, job: Job) -> None:
        if self.journal is not None and job.journal_no:
            self.journal.done(job.journal_no)

    def cancel(self, target_id: str, owner: str) -> tuple[str, Job] | None:
        """Remove a queued job (returned so its owner gets a reply) or flag a running one;
        only the client key that sent it may (with its id, which others never see)."""
        with self._cond:
            job = self.running.get(target_id)
            if job is not None and job.owner == owner:
                job.cancel.set()
                return "running", job
            for client, q in self._queues.items():
                for job in q:
                    if job.id == target_id and job.owner == owner:
                        q.remove(job)
                        self._size -= 1
                        if not q:
                            del self._queues[client]
                        self._journal_done(job)  # its `cancelled` reply follows at once
                        return "queued", job
        return None

    def drain(self) -> list[Job]:
        """Everything still queued (at shutdown every accepted request gets a reply)."""
        with self._cond:
            jobs = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._size = 0
            for job in jobs:  # each gets its `cancelled` reply at once
                self._journal_done(job)
            return jobs
