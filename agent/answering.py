"""The engine worker: one query at a time from the scheduler, answered from the active pack.

It reads the sensors the question is about, builds the grounded prompt, streams chunks and
sends the final reply with the exact facts. Every accepted request gets exactly one final
or error reply, whatever happens; the answer goes only to the request's reply topic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.config import AgentConfig
from agent.errors import AgentError, Cancelled, Timeout
from agent.grounding import build_question, select_sensors, ungrounded_numbers
from agent.inference import Completion, Engine, GenerationRequest
from agent.inference.sampling import SamplingParams
from agent.messages import ReplyTo, chunk_reply, error_reply, final_reply
from agent.packs.active import ActivePack
from agent.scheduling import Job, Scheduler
from agent.sensors.hub import SensorHub
from agent.sensors.windows import Fact
from agent.telemetry.metrics import Answered

log = structlog.get_logger("edge_agent")
Reply = Callable[[ReplyTo, dict[str, Any]], None]


class Answerer:
    def __init__(
        self,
        active: ActivePack,
        scheduler: Scheduler,
        hub: SensorHub,
        settings: Callable[[], AgentConfig],
        reply: Reply,
        answered: Callable[[Answered], None] = lambda a: None,
    ) -> None:
        self.active, self.scheduler, self.hub = active, scheduler, hub
        self._settings = settings
        self._reply = reply
        self._answered = answered  # telemetry: each answered query's figures

    def run(self, stopping: threading.Event) -> None:
        """Serve until ``stopping`` is set."""
        while not stopping.is_set():
            job = self.scheduler.next(timeout_s=0.5)
            if job is None:
                continue
            try:
                self.serve(job)
            except Exception:  # serve() already answered; nothing may stop the worker
                log.exception("worker_failed", id=job.id)

    def serve(self, job: Job) -> None:
        """Answer one job; never leaves it without a reply."""
        outcome, tokens = "internal", 0
        try:
            outcome, tokens = self._answer(job)
        except AgentError as err:
            self._reply(job.reply, error_reply(job.id, 0, err))
            outcome = err.code
        except Exception as exc:  # never leave an accepted request without a reply
            log.exception("query_failed", id=job.id)
            self._reply(
                job.reply, error_reply(job.id, 0, AgentError(f"internal error: {type(exc).__name__}"))
            )
        finally:
            self.scheduler.done(job)
        log.info(
            "query_done",
            id=job.id,
            client=job.client,
            outcome=outcome,
            completion_tokens=tokens,
            total_ms=round((time.monotonic() - job.received) * 1000, 1),
        )

    def _answer(self, job: Job) -> tuple[str, int]:
        """Run one query; returns (outcome, completion tokens) for the request log."""
        with self.active.serving(job.deadline) as engine:
            started = time.monotonic()
            if started > job.deadline:
                raise Timeout(f"request waited {started - job.received:.1f}s in the queue, past its deadline")
            if job.cancel.is_set():
                raise Cancelled(f"request {job.id} was cancelled")
            facts = [
                self.hub.read(s.name, "last", None)
                for s in select_sensors(job.query.question, self._settings().sensors)
            ]
            done, seq = self._generate(engine, job, facts)
        if done.finish_reason in ("cancelled", "deadline"):
            err: AgentError = (
                Timeout(f"deadline passed after {len(done.token_ids)} tokens")
                if done.finish_reason == "deadline"
                else Cancelled(f"request {job.id} was cancelled after {len(done.token_ids)} tokens")
            )
            self._reply(job.reply, error_reply(job.id, seq, err))
            return err.code, len(done.token_ids)
        final = self._final(job, done, facts, seq, started, engine)
        self._reply(job.reply, final)
        u = done.usage
        self._answered(
            Answered(
                latency_ms=(time.monotonic() - job.received) * 1000,
                ttft_ms=u.time_to_first_token_s * 1000,
                tokens_per_s=u.decode_tokens_per_s,
                grounded=bool(final.get("grounded")),
            )
        )
        return "final", len(done.token_ids)

    def _generate(self, engine: Engine, job: Job, facts: list[Fact]) -> tuple[Completion, int]:
        q, prompt_cfg = job.query, self._settings().prompt
        prompt = engine.prompt_ids(build_question(q.question, facts), prompt_cfg.system)
        params = SamplingParams(
            temperature=prompt_cfg.temperature if q.temperature is None else q.temperature,
            top_p=1.0 if q.top_p is None else q.top_p,
            top_k=q.top_k or 0,
            seed=q.seed,
            repetition_penalty=prompt_cfg.repetition_penalty,
        )
        req = GenerationRequest(
            prompt, q.max_tokens or prompt_cfg.max_tokens, params, q.stop, deadline=job.deadline
        )
        seq = [0]

        def on_delta(delta: str) -> None:
            if q.stream:
                self._reply(job.reply, chunk_reply(job.id, seq[0], delta))
                seq[0] += 1

        done = engine.generate(req, on_delta, job.cancel)
        return done, seq[0]  # the next sequence number after the chunks sent

    def _final(
        self, job: Job, done: Completion, facts: list[Fact], seq: int, started: float, engine: Engine
    ) -> dict[str, Any]:
        ungrounded = ungrounded_numbers(done.text, facts, job.query.question)
        u = done.usage
        return final_reply(
            job.id,
            seq,
            text=done.text,
            facts=[f.to_json() for f in facts],
            grounded=not ungrounded,
            ungrounded=ungrounded,
            finish_reason=done.finish_reason,
            usage={
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "time_to_first_token_ms": round(u.time_to_first_token_s * 1000, 1),
                "tokens_per_s": round(u.decode_tokens_per_s, 1),
                "queue_wait_ms": round((started - job.received) * 1000, 1),
                "engine_ms": round(u.total_s * 1000, 1),
            },
            pack={"name": engine.pack.manifest.name, "version": engine.pack.manifest.version},
        )
