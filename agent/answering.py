"""The engine worker: one query at a time from the scheduler, answered from the active pack.

It grounds the question without the model (agent/answers: the sensors asked about, one fact
per intent, verdicts from the sensors' configured meaning), asks the model to phrase the
facts and verdicts, and checks the text against them (numbers, units, verdict words, the
leading Yes/No, sensors not asked about). A text that fails is tried once more with a tighter
prompt; if that fails too, the answer is the template built from the facts (``source:
template``), never silence and never a contradiction. Chunks stream the first try as it is
generated; the final reply's text is the one that passed. Every accepted request gets exactly
one final or error reply, whatever happens; the answer goes only to the request's reply topic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.answers.pipeline import Grounds, ground
from agent.answers.prompt import build_prompt, build_retry_prompt
from agent.answers.validate import Checks
from agent.answers.verdicts import Verdict
from agent.config import AgentConfig
from agent.errors import AgentError, Cancelled, Timeout, TooLarge
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
            cfg = self._settings()
            meanings = {s.name: s.meaning for s in cfg.sensors if s.meaning is not None}
            g = ground(job.query.question, cfg.sensors, meanings, self.hub.read, time.time())
            try:
                done, seq = self._generate(
                    engine, job, build_prompt(job.query.question, g.verdicts), stream=True
                )
            except TooLarge:
                if not g.verdicts or not self._question_fits(engine, job):
                    raise  # the question itself does not fit, or nothing is computed to answer with
                answer, seq = self._template_only(job, g), 0
            else:
                if done.finish_reason in ("cancelled", "deadline"):
                    err: AgentError = (
                        Timeout(f"deadline passed after {len(done.token_ids)} tokens")
                        if done.finish_reason == "deadline"
                        else Cancelled(f"request {job.id} was cancelled after {len(done.token_ids)} tokens")
                    )
                    self._reply(job.reply, error_reply(job.id, seq, err))
                    return err.code, len(done.token_ids)
                answer = self._checked(engine, job, g, done)
        final = self._final(job, answer, g, seq, started, engine)
        self._reply(job.reply, final)
        u = answer.completion.usage if answer.completion is not None else None
        self._answered(
            Answered(
                latency_ms=(time.monotonic() - job.received) * 1000,
                ttft_ms=u.time_to_first_token_s * 1000 if u else 0.0,
                tokens_per_s=u.decode_tokens_per_s if u else 0.0,
                grounded=answer.checks.numbers.status != "failed",
                source=answer.source,
                retried=answer.retries > 0,
            )
        )
        return "final", len(answer.completion.token_ids) if answer.completion is not None else 0

    def _generate(self, engine: Engine, job: Job, user: str, stream: bool) -> tuple[Completion, int]:
        """One model run on ``user`` (the grounded prompt); chunks only when ``stream``."""
        q, prompt_cfg = job.query, self._settings().prompt
        prompt = engine.prompt_ids(user, prompt_cfg.system)
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
            if q.stream and stream:
                self._reply(job.reply, chunk_reply(job.id, seq[0], delta))
                seq[0] += 1

        done = engine.generate(req, on_delta, job.cancel)
        return done, seq[0]  # the next sequence number after the chunks sent

    def _checked(self, engine: Engine, job: Job, g: Grounds, first: Completion) -> Answer:
        """The first text if it passes the checks; else one retry with the tighter prompt
        (not streamed); else the template, which passes by construction. ``check_s`` counts
        the checks only, not the retry's generation."""
        timer = _Timer()
        checks = timer.run(g.check, first.text)
        if checks.passed:
            return Answer(first.text, checks, "model", 0, first, timer.total)
        last = first
        try:
            prompt = build_retry_prompt(job.query.question, g.verdicts, checks)
            last, _ = self._generate(engine, job, prompt, stream=False)
            if last.finish_reason not in ("cancelled", "deadline"):
                again = timer.run(g.check, last.text)
                if again.passed:
                    return Answer(last.text, again, "model", 1, last, timer.total, checks)
        except AgentError as err:  # e.g. the longer prompt does not fit the context: the template
            log.info("answer_retry_skipped", id=job.id, code=err.code, reason=err.message[:200])
        text = g.fallback()
        log.info("answer_fallback", id=job.id, failed=checks.failed, text=first.text[:200])
        return Answer(text, timer.run(g.check, text), "template", 1, last, timer.total, checks)

    def _question_fits(self, engine: Engine, job: Job) -> bool:
        """Whether the bare question (with its max_tokens) fits the context: then only what
        grounding added does not, and the computed answer may stand in for the model's."""
        q = job.query
        try:
            ids = engine.prompt_ids(q.question, self._settings().prompt.system)
            engine.check_fits(len(ids), q.max_tokens or self._settings().prompt.max_tokens)
        except TooLarge:
            return False
        return True

    def _template_only(self, job: Job, g: Grounds) -> Answer:
        """The model cannot take the grounded prompt (it does not fit its context): the facts
        and verdicts in words are the answer."""
        log.info("answer_template_only", id=job.id, reason="prompt does not fit the context")
        timer = _Timer()
        text = g.fallback()
        return Answer(text, timer.run(g.check, text), "template", 0, None, timer.total)

    def _final(
        self, job: Job, answer: Answer, g: Grounds, seq: int, started: float, engine: Engine
    ) -> dict[str, Any]:
        run = answer.completion
        numbers = answer.checks.numbers
        by_fact = {(v.sensor, v.agg): v for v in g.verdicts}
        return final_reply(
            job.id,
            seq,
            text=answer.text,
            facts=[_fact_json(f, by_fact.get((f.sensor, f.agg))) for f in g.facts],
            verdicts=[v.to_json() for v in g.verdicts],
            grounded=numbers.status != "failed",
            ungrounded=list(numbers.offending),
            checks=answer.checks.to_json(),
            source=answer.source,
            retries=answer.retries,
            first_checks=answer.first_checks.to_json() if answer.first_checks is not None else None,
            finish_reason=run.finish_reason if run is not None else None,
            usage=_usage(run, started - job.received, answer.check_s),
            pack={"name": engine.pack.manifest.name, "version": engine.pack.manifest.version},
        )


@dataclass(frozen=True)
class Answer:
    """The text that goes out, how it was checked and where it came from."""

    text: str
    checks: Checks
    source: str  # model | template
    retries: int
    completion: Completion | None  # the last model run (its usage is reported); None: none ran
    check_s: float  # validation time (the checks themselves, not the retry's generation)
    first_checks: Checks | None = None  # the first text's failed checks, when it was replaced


def _usage(run: Completion | None, queue_wait_s: float, check_s: float) -> dict[str, float | int]:
    """The reply's usage: the last model run's (zeros when none ran), the wait, the checks."""
    u = run.usage if run is not None else None
    return {
        "prompt_tokens": u.prompt_tokens if u else 0,
        "completion_tokens": u.completion_tokens if u else 0,
        "time_to_first_token_ms": round(u.time_to_first_token_s * 1000, 1) if u else 0.0,
        "tokens_per_s": round(u.decode_tokens_per_s, 1) if u else 0.0,
        "queue_wait_ms": round(queue_wait_s * 1000, 1),
        "engine_ms": round(u.total_s * 1000, 1) if u else 0.0,
        "checks_ms": round(check_s * 1000, 2),
    }


class _Timer:
    """Adds up the time spent in the calls it runs."""

    def __init__(self) -> None:
        self.total = 0.0

    def run(self, fn: Callable[[str], Checks], text: str) -> Checks:
        started = time.perf_counter()
        try:
            return fn(text)
        finally:
            self.total += time.perf_counter() - started


def _fact_json(fact: Fact, verdict: Verdict | None) -> dict[str, object]:
    """A fact as replies carry it, with its verdict and band when one was computed."""
    out = fact.to_json()
    if verdict is not None:
        out["verdict"], out["band"] = verdict.verdict, verdict.band
    return out
