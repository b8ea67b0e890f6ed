"""The engine worker: one query at a time from the scheduler, answered from the active pack.

It grounds the question without the model (agent/answers: the sensors asked about, one fact
per intent, verdicts from the sensors' configured meaning), asks the model to phrase the
facts and verdicts, and checks the text against them (numbers, units, verdict words, the
leading Yes/No, sensors not asked about). A text that fails is tried once more with a tighter
prompt; if that fails too, the answer is the template built from the facts (``source:
template``), never silence and never a contradiction. With an ``escalation:`` endpoint the
routing policy (agent/answers/routing.py) may send the facts (and, if privacy allows, the
question) to a larger model first or after the local answer; its text is checked the same way
and used only if it passes (``source: escalated``), within the request's deadline. Chunks
stream the local first try as it is generated; the final reply's text is the one that passed.
Every accepted request gets exactly one final or error reply, whatever happens; the answer goes
only to the request's reply topic.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from agent.answers.escalation import EscalationFailed, EscalationPrompt
from agent.answers.hybrid import OFF, Hybrid
from agent.answers.pipeline import Grounds, ground
from agent.answers.prompt import build_prompt, build_retry_prompt, facts_block
from agent.answers.routing import LocalOutcome, Routing, RoutingInput, decide, needs_knowledge
from agent.answers.template import display_name
from agent.answers.validate import Checks
from agent.answers.verdicts import Verdict
from agent.config import AgentConfig
from agent.errors import AgentError, Cancelled, Timeout, TooLarge
from agent.inference import Completion, Engine, GenerationRequest
from agent.inference.sampling import SamplingParams
from agent.messages import ReplyTo, Route, chunk_reply, error_reply, final_reply
from agent.packs.active import ActivePack
from agent.scheduling import Job, Scheduler
from agent.sensors.hub import SensorHub
from agent.sensors.windows import Fact
from agent.telemetry.metrics import Answered

log = structlog.get_logger("edge_agent")
Reply = Callable[[ReplyTo, dict[str, Any]], None]
_REPLY_MARGIN_S = 0.05  # kept before the deadline for checking a late text and replying


class _Cut(Exception):
    """The local run stopped by a cancel or the deadline, after ``seq`` chunks."""

    def __init__(self, error: AgentError, seq: int, tokens: int, deadline: bool) -> None:
        super().__init__(error.message)
        self.error, self.seq, self.tokens, self.deadline = error, seq, tokens, deadline


@dataclass
class _Path:
    """How one request was routed, for its reply and the counters."""

    route: Route
    routing: Routing | None = None  # the decision that chose the answer's way (see the reply)
    escalation_error: str | None = None  # an EscalationFailed reason, or checks_failed
    upstream_ms: float | None = None  # the escalation call's time, when one was made

    def to_json(self) -> dict[str, Any]:
        r = self.routing
        assert r is not None
        return {
            "decision": r.decision,
            "code": r.code,
            "escalation_error": self.escalation_error,
            "upstream_ms": self.upstream_ms,
        }


class Answerer:
    def __init__(
        self,
        active: ActivePack,
        scheduler: Scheduler,
        hub: SensorHub,
        settings: Callable[[], AgentConfig],
        reply: Reply,
        answered: Callable[[Answered], None] = lambda a: None,
        hybrid: Callable[[], Hybrid] = lambda: OFF,
    ) -> None:
        self.active, self.scheduler, self.hub = active, scheduler, hub
        self._settings = settings
        self._hybrid = hybrid  # the escalation endpoint and routing policy (agent/answers/hybrid.py)
        self._counts_lock = threading.Lock()
        self._counts: dict[str, Any] = {"route": {}, "decision": {}, "escalated": 0, "escalation_failed": {}}
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
        """Run one query; returns (outcome, completion tokens) for the request log.

        Routing (agent/answers/routing.py) is asked at each step: before the local model
        (``route: remote``, or no sensor matched and the question needs knowledge: escalate
        first), after a failed escalation (local, or the template when too little time is left),
        and after the local answer (escalate when it failed its checks or was unsure). The
        escalation runs outside ``active.serving``: the engine is not held while the upstream
        answers, so a pack swap is not held up by it (the worker still answers one query at a
        time). Its text is checked like the model's; one that fails is not used."""
        picked_up = time.monotonic()
        self._admit(job, picked_up)
        cfg, hybrid = self._settings(), self._hybrid()
        meanings = {s.name: s.meaning for s in cfg.sensors if s.meaning is not None}
        g = ground(job.query.question, cfg.sensors, meanings, self.hub.read, time.time())
        path = _Path(job.query.route)
        inp = RoutingInput(
            route=job.query.route,
            escalation=hybrid.escalation,
            sensors_matched=len(g.picks),
            needs_knowledge=needs_knowledge(job.query.question),
            time_left_s=job.deadline - time.monotonic(),
        )
        path.routing = decide(inp, hybrid.policy)
        answer: Answer | None = None
        local_deadline = job.deadline
        if path.routing.decision == "escalate_first":
            # the time after this escalation's deadline is the local answer's (min_local_s)
            reserve = max(hybrid.policy.min_local_s, _REPLY_MARGIN_S)
            answer = self._escalate(job, g, hybrid, path, job.deadline - reserve)
            if answer is None:
                if job.cancel.is_set():
                    raise Cancelled(f"request {job.id} was cancelled")
                left = job.deadline - time.monotonic()
                after = decide(replace(inp, tried_remote=True, time_left_s=left), hybrid.policy)
                if after.decision == "template":
                    answer = self._template_only(job, g, "no time left for the local model")
                local_deadline = job.deadline - _REPLY_MARGIN_S  # cut short: then the template
        seq, started, pack = 0, picked_up, self.active.info()
        if answer is None:
            try:
                answer, seq, started, pack = self._local(job, g, local_deadline)
            except _Cut as cut:
                if not (cut.deadline and path.escalation_error is not None):
                    self._reply(job.reply, error_reply(job.id, cut.seq, cut.error))
                    return cut.error.code, cut.tokens
                # after a failed escalation the reply still comes before the deadline
                answer, seq = self._template_only(job, g, "the local model ran out of time"), cut.seq
            except Timeout:  # waited for a pack swap, or the time ran out before it started
                if path.escalation_error is None:
                    raise
                answer = self._template_only(job, g, "no time left for the local model")
            if path.escalation_error is None:
                run = answer.completion
                outcome = LocalOutcome(
                    answer.source == "model", run.usage.mean_logprob if run is not None else None
                )
                left = job.deadline - time.monotonic()
                before, path.routing = (
                    path.routing,
                    decide(replace(inp, local=outcome, time_left_s=left), hybrid.policy),
                )
                if before.blocked is not None and path.routing.reason == "passed":
                    path.routing = before  # e.g. route remote with escalation off: say why not
                if path.routing.decision == "escalate_after_local":
                    better = self._escalate(job, g, hybrid, path, job.deadline - _REPLY_MARGIN_S, answer)
                    answer = better or answer  # failed: the local answer if it passed, else its template
        self._count(path, answer)
        self._reply(job.reply, self._final(job, answer, g, seq, started, pack, path))
        u = answer.completion.usage if answer.completion is not None else None
        self._answered(
            Answered(
                latency_ms=(time.monotonic() - job.received) * 1000,
                ttft_ms=u.time_to_first_token_s * 1000 if u else 0.0,
                tokens_per_s=u.decode_tokens_per_s if u else 0.0,
                grounded=answer.checks.numbers.status != "failed",
                source=answer.source,
                retried=answer.retries > 0,
                route=job.query.route,
                escalation_error=path.escalation_error,
            )
        )
        return "final", len(answer.completion.token_ids) if answer.completion is not None else 0

    def _admit(self, job: Job, now: float) -> None:
        if now > job.deadline:
            raise Timeout(f"request waited {now - job.received:.1f}s in the queue, past its deadline")
        if job.cancel.is_set():
            raise Cancelled(f"request {job.id} was cancelled")

    def _local(
        self, job: Job, g: Grounds, deadline: float
    ) -> tuple[Answer, int, float, dict[str, str] | None]:
        """The local model's answer (first try streamed, checks, retry, template):
        (answer, next chunk seq, start of generation, pack). A run cut by a cancel or the
        deadline raises :class:`_Cut`."""
        with self.active.serving(deadline) as engine:
            started = time.monotonic()
            self._admit(job, started)
            if started > deadline:
                raise Timeout("no time left for the local model")
            pack = {"name": engine.pack.manifest.name, "version": engine.pack.manifest.version}
            try:
                done, seq = self._generate(
                    engine, job, build_prompt(job.query.question, g.verdicts), True, deadline, _start(g)
                )
            except TooLarge:
                if not g.verdicts or not self._question_fits(engine, job):
                    raise  # the question itself does not fit, or nothing is computed to answer with
                return self._template_only(job, g, "prompt does not fit the context"), 0, started, pack
            if done.finish_reason in ("cancelled", "deadline"):
                n = len(done.token_ids)
                err: AgentError = (
                    Timeout(f"deadline passed after {n} tokens")
                    if done.finish_reason == "deadline"
                    else Cancelled(f"request {job.id} was cancelled after {n} tokens")
                )
                raise _Cut(err, seq, n, done.finish_reason == "deadline")
            return self._checked(engine, job, g, done, deadline), seq, started, pack

    def _escalate(
        self, job: Job, g: Grounds, hybrid: Hybrid, path: _Path, deadline: float, local: Answer | None = None
    ) -> Answer | None:
        """The upstream's answer if it came by ``deadline`` and passed the same checks, else
        None with ``path.escalation_error`` set (the reason, or ``checks_failed``). Only the
        facts block, the verdicts and the question go into the request; what of it leaves the
        device is the escalation module's privacy rule."""
        assert hybrid.escalator is not None  # routing escalates only when one is configured
        prompt = EscalationPrompt(
            facts=facts_block(g.verdicts),
            verdicts=tuple(_verdict_line(v) for v in g.verdicts),
            question=job.query.question,
        )
        started = time.monotonic()
        try:
            result = hybrid.escalator.complete(prompt, deadline)
        except EscalationFailed as failed:
            path.escalation_error = failed.reason
            return None
        finally:
            path.upstream_ms = round((time.monotonic() - started) * 1000, 1)
        timer = _Timer()
        checks = timer.run(g.check, result.text)
        if not checks.passed:
            path.escalation_error = "checks_failed"
            log.info("escalation_rejected", id=job.id, failed=checks.failed, text=result.text[:200])
            return None
        check_s = timer.total + (local.check_s if local is not None else 0.0)
        if local is None:
            return Answer(result.text, checks, "escalated", 0, None, check_s)
        # the local run's usage and first checks stay reported: what the local model did
        return Answer(
            result.text, checks, "escalated", local.retries, local.completion, check_s, local.first_checks
        )

    def _count(self, path: _Path, answer: Answer) -> None:
        """The status report's routing counts (since start)."""
        r = path.routing
        assert r is not None
        with self._counts_lock:
            c = self._counts
            c["route"][path.route] = c["route"].get(path.route, 0) + 1
            by_code = c["decision"].setdefault(r.decision, {})
            by_code[r.code] = by_code.get(r.code, 0) + 1
            if answer.source == "escalated":
                c["escalated"] += 1
            if path.escalation_error is not None:
                failed = c["escalation_failed"]
                failed[path.escalation_error] = failed.get(path.escalation_error, 0) + 1

    def routing_counts(self) -> dict[str, Any]:
        """Answered queries since start: by the route asked, by the routing decision and its
        code, escalated answers, and failed escalations by reason (``cmd status``)."""
        with self._counts_lock:
            return json.loads(json.dumps(self._counts))  # type: ignore[no-any-return]

    def _generate(
        self, engine: Engine, job: Job, user: str, stream: bool, deadline: float, start: str = ""
    ) -> tuple[Completion, int]:
        """One model run on ``user`` (the grounded prompt); chunks only when ``stream``.
        ``start``: the answer's first words, given to the model to continue ("Yes," when the
        rules computed yes) and part of the returned text (and the first chunk). Measured on
        the question set: asked in the prompt to start with the computed Yes or No, the 135M
        model never did (0 of 43), so every yes/no answer was the template; written into its
        turn, the model phrases the rest (bench/answers.py)."""
        q, prompt_cfg = job.query, self._settings().prompt
        prompt = engine.prompt_ids(user, prompt_cfg.system, answer_start=start)
        params = SamplingParams(
            temperature=prompt_cfg.temperature if q.temperature is None else q.temperature,
            top_p=1.0 if q.top_p is None else q.top_p,
            top_k=q.top_k or 0,
            seed=q.seed,
            repetition_penalty=prompt_cfg.repetition_penalty,
        )
        req = GenerationRequest(
            prompt, q.max_tokens or prompt_cfg.max_tokens, params, q.stop, deadline=deadline
        )
        seq = [0]

        def on_delta(delta: str) -> None:
            if q.stream and stream:
                self._reply(job.reply, chunk_reply(job.id, seq[0], delta))
                seq[0] += 1

        if start:
            on_delta(start)
        done = engine.generate(req, on_delta, job.cancel)
        if start:
            done = dataclasses.replace(done, text=start + done.text)
        return done, seq[0]  # the next sequence number after the chunks sent

    def _checked(self, engine: Engine, job: Job, g: Grounds, first: Completion, deadline: float) -> Answer:
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
            last, _ = self._generate(engine, job, prompt, False, deadline, _start(g))
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

    def _template_only(self, job: Job, g: Grounds, reason: str) -> Answer:
        """The model cannot answer (its grounded prompt does not fit its context, or no time is
        left after a failed escalation): the facts and verdicts in words are the answer."""
        log.info("answer_template_only", id=job.id, reason=reason)
        timer = _Timer()
        text = g.fallback()
        return Answer(text, timer.run(g.check, text), "template", 0, None, timer.total)

    def _final(
        self,
        job: Job,
        answer: Answer,
        g: Grounds,
        seq: int,
        started: float,
        pack: dict[str, str] | None,
        path: _Path,
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
            pack=pack,
            routing=path.to_json(),
        )


@dataclass(frozen=True)
class Answer:
    """The text that goes out, how it was checked and where it came from."""

    text: str
    checks: Checks
    source: str  # model | template | escalated
    retries: int
    completion: Completion | None  # the last model run (its usage is reported); None: none ran
    check_s: float  # validation time (the checks themselves, not the retry's generation)
    first_checks: Checks | None = None  # the first text's failed checks, when it was replaced


def _usage(run: Completion | None, queue_wait_s: float, check_s: float) -> dict[str, float | int]:
    """The reply's usage: the last model run's (zeros when none ran), the wait, the checks."""
    u = run.usage if run is not None else None
    return {
        "prompt_tokens": u.prompt_tokens if u else 0,
        "cached_prompt_tokens": u.cached_prompt_tokens if u else 0,
        "completion_tokens": u.completion_tokens if u else 0,
        "time_to_first_token_ms": round(u.time_to_first_token_s * 1000, 1) if u else 0.0,
        "tokens_per_s": round(u.decode_tokens_per_s, 1) if u else 0.0,
        "queue_wait_ms": round(queue_wait_s * 1000, 1),
        "engine_ms": round(u.total_s * 1000, 1) if u else 0.0,
        "checks_ms": round(check_s * 1000, 2),
    }


def _start(g: Grounds) -> str:
    """The computed Yes or No the answer must begin with, or nothing."""
    return "" if g.answer is None else ("Yes, " if g.answer else "No, ")


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


def _verdict_line(v: Verdict) -> str:
    """One computed verdict for the upstream: "Soil moisture: too_dry (answer: yes)"."""
    line = f"{display_name(v.sensor)}: {v.verdict}"
    if v.band is not None and v.band != v.verdict:
        line += f", band {v.band}"
    if v.answer is not None:
        line += f" (answer: {'yes' if v.answer else 'no'})"
    return line


def _fact_json(fact: Fact, verdict: Verdict | None) -> dict[str, object]:
    """A fact as replies carry it, with its verdict and band when one was computed."""
    out = fact.to_json()
    if verdict is not None:
        out["verdict"], out["band"] = verdict.verdict, verdict.band
    return out
