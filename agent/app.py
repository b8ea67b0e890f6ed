"""Composition root: config -> pack/engine, sensors, transport, router, scheduler, worker.

Threads: paho's network thread (only enqueues), the dispatcher (routes messages and
ticks the systemd watchdog), one engine worker (queries, one at a time) and sensor
pollers. The previous engine keeps answering until a reloaded one is ready.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from typing import Any

import structlog

from agent import __version__
from agent.config import AgentConfig, load_config, systemd_env
from agent.errors import AgentError, Cancelled, ModelUnavailable, Timeout
from agent.grounding import build_question, select_sensors, ungrounded_numbers
from agent.inference import Engine, GenerationRequest, load_pack
from agent.inference.pack import available_ram_mb
from agent.inference.sampling import SamplingParams
from agent.messages import ReplyTo, chunk_reply, encode, error_reply, final_reply
from agent.notify import Notifier
from agent.packs.service import CRASH_LOOP_BOOTS, UpdateService, probe, seed_if_empty
from agent.packs.store import PackStore
from agent.router import Router
from agent.scheduling import Job, RateLimiter, Scheduler
from agent.sensors.hub import SensorHub
from agent.transport import MqttTransport
from agent.transport.mqtt import Will
from model_packs.errors import PackError

log = structlog.get_logger("edge_agent")
CAPABILITIES = ["query", "read", "cmd", "stream"]


class Agent:
    def __init__(
        self, cfg: AgentConfig, config_path: Path | None = None, notifier: Notifier | None = None
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        env = systemd_env()
        self.notifier = notifier or Notifier(env.notify_socket, env.watchdog_usec)
        self.started = time.monotonic()
        self.hub = SensorHub(cfg)
        self.scheduler = Scheduler(cfg.limits)
        self.limiter = RateLimiter(cfg.limits.rate.per_s, cfg.limits.rate.burst)
        self.engine: Engine | None = None
        self.engine_error: str | None = None
        self.state = "online"
        self._paused = threading.Event()
        self._serving = threading.Lock()  # held by the worker while it answers a query
        self._engine_lock = threading.Lock()
        self.store = PackStore(Path(cfg.state_dir))
        self.store.converge()
        self.updates = UpdateService(self)
        self._boot_pack()
        self.router = Router(self)
        self.stopping = threading.Event()
        self.transport = MqttTransport(
            cfg.mqtt,
            cfg.device_id,
            self._subscriptions(),
            Will(cfg.topic("status"), self._status_doc("offline")),
            on_connect=self._publish_status,
        )
        self._threads = [
            threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True),
            threading.Thread(target=self._worker_loop, name="engine-worker", daemon=True),
        ]

    # ------------------------------------------------------------ lifecycle

    def _subscriptions(self) -> list[str]:
        return [self.cfg.topic(k) for k in ("query", "read", "cmd", "update")] + sorted(self.hub.topics)

    def _open_engine(self, path: Path | None, cfg: AgentConfig) -> tuple[Engine | None, str | None]:
        if path is None:
            return None, self.engine_error or "no pack in the store"
        try:
            engine = Engine(load_pack(path), threads=cfg.pack.threads, context_length=cfg.pack.context_length)
        except (PackError, AgentError) as exc:
            log.error("pack_load_failed", pack=str(path), reason=exc.message)
            return None, f"[{exc.code}] {exc.message}"
        log.info(
            "pack_loaded",
            pack=str(path),
            name=engine.pack.manifest.name,
            version=engine.pack.manifest.version,
            threads=engine.threads,
        )
        return engine, None

    def _boot_pack(self) -> None:
        """Seed an empty store, count boots of a pack on trial, serve the active slot."""
        try:
            seed_if_empty(self.store, self.cfg.pack.path)
        except PackError as exc:
            self.engine_error = f"[{exc.code}] {exc.message}"
            log.error("store_seed_failed", reason=self.engine_error)
            return
        st = self.store.note_boot()
        if st.trial and st.trial_boots > CRASH_LOOP_BOOTS:
            self.store.rollback(f"crash loop: {st.trial_boots} starts without a passing health probe")
        self.serve_active_slot()

    def serve_active_slot(self) -> str | None:
        """Load the active slot. A pack on trial must pass its first health probe, else
        the store rolls back and the previous pack serves. Returns the failure, if any."""
        st = self.store.state()
        engine, error = self._open_engine(self.store.active_path(), self.cfg)
        if engine is not None and st.trial:
            error = probe(engine)
            engine = None if error else engine
        if engine is None:
            if st.trial and self.store.rollback(error or "failed after activation"):
                log.warning("pack_rolled_back", reason=error, to=self.store.active_version())
                engine, _ = self._open_engine(self.store.active_path(), self.cfg)
            if engine is None:
                self.engine_error = error
                return error
        elif st.trial:
            self.store.confirm()
        with self._engine_lock:
            self.engine, self.engine_error = engine, None
        return error

    def start(self) -> None:
        self.hub.start()
        self.transport.start()
        for t in self._threads:
            t.start()

    def run(self) -> None:
        """Serve until ``stop()``; tells systemd READY once connected."""
        self.start()
        while not self.transport.wait_connected(1.0):
            if self.stopping.is_set():
                return
            self.notifier.watchdog()
        self.notifier.ready(f"serving {self.pack_label()}")
        self.stopping.wait()

    def stop(self) -> None:
        self.notifier.stopping()
        self.stopping.set()
        for job in self.scheduler.drain():
            self.reply(job.reply, error_reply(job.id, 0, Cancelled("the agent is shutting down")))
        self.hub.stop()
        for t in self._threads:
            t.join(timeout=5)
        self.transport.stop(last=(self.cfg.topic("status"), self._status_doc("offline")))

    # ------------------------------------------------------------ replies and status

    def reply(self, target: ReplyTo, body: dict[str, Any]) -> None:
        self.transport.publish(target.topic, encode(body), correlation_data=target.correlation_data)

    def pack_info(self) -> dict[str, str] | None:
        engine = self.engine
        if engine is None:
            return None
        return {"name": engine.pack.manifest.name, "version": engine.pack.manifest.version}

    def pack_label(self) -> str:
        info = self.pack_info()
        return f"{info['name']} {info['version']}" if info else "no pack"

    def _status_doc(self, state: str) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "state": state,
                "device_id": self.cfg.device_id,
                "pack": self.pack_info(),
                "capabilities": CAPABILITIES,
                "agent_version": __version__,
                "ts": time.time(),
            }
        ).encode()

    def _publish_status(self) -> None:
        self.transport.publish(self.cfg.topic("status"), self._status_doc(self.state), retain=True)

    def set_state(self, state: str) -> None:
        self.state = state
        self._publish_status()

    def status_report(self) -> dict[str, Any]:
        return {
            "state": "online",
            "device_id": self.cfg.device_id,
            "pack": self.pack_info(),
            "pack_error": self.engine_error,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "queue_depth": self.scheduler.depth,
            "running": sorted(self.scheduler.running),
            "sensors": self.hub.summary(),
            "packs": self._store_report(),
            "mqtt_connects": self.transport.connects,
        }

    @contextmanager
    def shadow_room(self, need_mb: int) -> Iterator[bool]:
        """Room for a shadow session of ``need_mb``. When it does not fit beside the active
        pack, serving pauses: the running query finishes, queued ones wait (none is
        dropped), the active engine is unloaded, and it is reloaded afterwards."""
        engine = self.engine
        active_mb = engine.pack.manifest.runtime.min_ram_mb if engine else 0
        budget = self.cfg.updates.ram_budget_mb
        free = available_ram_mb() if budget is None else budget - active_mb
        if engine is None or free is None or need_mb <= free:
            yield False
            return
        log.warning("pausing_for_swap", need_mb=need_mb, free_mb=free, active_mb=active_mb)
        self._paused.set()
        self._serving.acquire()  # the running query finishes first
        try:
            with self._engine_lock:
                self.engine = None
            gc.collect()
            yield True
        finally:
            self.serve_active_slot()
            self._serving.release()
            self._paused.clear()

    def _store_report(self) -> dict[str, Any]:
        st = self.store.state()
        return {
            "active": st.versions.get(st.active or ""),
            "previous": st.versions.get(st.previous or ""),
            "trial": st.trial,
            "last_update": st.last_outcome or None,
        }

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and the pack; queued requests stay queued. On any
        failure the running config and engine stay as they were. Pack, prompt and limits
        apply at once; MQTT and sensor changes need a restart (the reply says so)."""
        cfg = load_config(self.config_path) if self.config_path else self.cfg
        before = self.pack_label()
        engine, error = self._open_engine(self.store.active_path(), cfg)
        if engine is None:
            if self.engine is not None:
                raise ModelUnavailable(f"reload failed, still serving {before}: {error}")
            raise ModelUnavailable(f"reload failed: {error}")
        with self._engine_lock:
            self.engine, self.engine_error = engine, None
        restart = [k for k in ("mqtt", "sensors", "device_id") if getattr(cfg, k) != getattr(self.cfg, k)]
        self.cfg = dataclasses.replace(
            cfg, mqtt=self.cfg.mqtt, sensors=self.cfg.sensors, device_id=self.cfg.device_id
        )
        self._publish_status()
        return {"reloaded": True, "pack": self.pack_info(), "previous": before, "restart_needed_for": restart}

    # ------------------------------------------------------------ threads

    def _dispatch_loop(self) -> None:
        next_tick = 0.0
        while not self.stopping.is_set():
            try:
                msg = self.transport.inbox.get(timeout=0.5)
                self.router.handle(msg)
            except Empty:
                pass
            now = time.monotonic()
            if now >= next_tick and self._worker_healthy(now):
                self.notifier.watchdog()
                next_tick = now + (self.notifier.watchdog_interval_s or 5.0)

    def _worker_healthy(self, now: float) -> bool:
        """A query running far past its deadline means a hung engine: stop feeding the watchdog."""
        return all(now < job.deadline + 30.0 for job in list(self.scheduler.running.values()))

    def _worker_loop(self) -> None:
        while not self.stopping.is_set():
            if self._paused.is_set():  # a pack swap that needs the memory: queued requests wait
                time.sleep(0.05)
                continue
            job = self.scheduler.next(timeout_s=0.5)
            if job is None:
                continue
            outcome, tokens = "internal", 0
            try:
                with self._serving:
                    outcome, tokens = self._answer(job)
            except AgentError as err:
                self.reply(job.reply, error_reply(job.id, 0, err))
                outcome = err.code
            except Exception as exc:  # never leave an accepted request without a reply
                log.exception("query_failed", id=job.id)
                self.reply(
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
        started = time.monotonic()
        if started > job.deadline:
            raise Timeout(f"request waited {started - job.received:.1f}s in the queue, past its deadline")
        if job.cancel.is_set():
            raise Cancelled(f"request {job.id} was cancelled")
        engine = self.engine
        if engine is None:
            raise ModelUnavailable(f"no model pack is loaded: {self.engine_error}")
        q, prompt_cfg = job.query, self.cfg.prompt
        facts = [self.hub.read(s.name, "last", None) for s in select_sensors(q.question, self.cfg.sensors)]
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
                self.reply(job.reply, chunk_reply(job.id, seq[0], delta))
                seq[0] += 1

        done = engine.generate(req, on_delta, job.cancel)
        if done.finish_reason in ("cancelled", "deadline"):
            err: AgentError = (
                Timeout(f"deadline passed after {len(done.token_ids)} tokens")
                if done.finish_reason == "deadline"
                else Cancelled(f"request {job.id} was cancelled after {len(done.token_ids)} tokens")
            )
            self.reply(job.reply, error_reply(job.id, seq[0], err))
            return err.code, len(done.token_ids)
        ungrounded = ungrounded_numbers(done.text, facts, q.question)
        u = done.usage
        self.reply(
            job.reply,
            final_reply(
                job.id,
                seq[0],
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
            ),
        )
        return "final", len(done.token_ids)
