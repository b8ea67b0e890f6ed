"""Composition root: config -> store and active pack, sensors, transport, router, worker.

Data flows one way: transport -> router -> scheduler -> answering -> engine (owned by
:class:`ActivePack`); instruction -> update service -> updater -> gate -> switch. Threads:
paho's network thread (only enqueues), the dispatcher (routes messages and feeds the
systemd watchdog), one answering worker, sensor pollers, and short-lived reload and update
threads. Nothing here does IO before :meth:`Agent.start`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.answering import Answerer
from agent.answers.hybrid import OFF, Hybrid, hybrid_from
from agent.authority import Authority, ReplayLedger, load_operator_keys
from agent.config import AgentConfig, load_config, restart_needed, systemd_env
from agent.dispatch import Dispatcher
from agent.errors import Cancelled, Interrupted, ModelUnavailable
from agent.homeassistant import Bridge, Ports
from agent.journal import Pending, RequestJournal
from agent.messages import ReplyTo, encode, error_reply
from agent.notify import Notifier
from agent.packs.active import ActivePack, engine_factory
from agent.packs.fetch import PackFetcher
from agent.packs.health import HealthBudget
from agent.packs.service import UpdateService
from agent.packs.store import PackStore
from agent.router import Handlers, Router
from agent.scheduling import RateLimiter, Scheduler
from agent.sensors.hub import SensorHub
from agent.status import status_document
from agent.telemetry.collect import Collector
from agent.telemetry.metrics import Answered, Metrics
from agent.telemetry.service import TelemetryService
from agent.telemetry.spool import Spool
from agent.transport import Inbound, MqttTransport
from agent.transport.mqtt import Will
from model_packs import hardware as hw
from model_packs.instructions import Instruction

log = structlog.get_logger("edge_agent")


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
        fetcher: PackFetcher | None = None,
    ) -> None:
        self.cfg, self.config_path = cfg, config_path
        env = systemd_env()
        self.notifier = notifier or Notifier(env.notify_socket, env.watchdog_usec)
        self.started = time.monotonic()
        self.reply_failures = 0  # counted, reported by `cmd status`
        self.stopping = threading.Event()
        self.hub = SensorHub(cfg, Path(cfg.state_dir) / "sensors.json")
        self.journal = RequestJournal(Path(cfg.state_dir) / "requests.journal")
        self.scheduler = Scheduler(cfg.limits, journal=self.journal)
        self._interrupted: list[Pending] = []
        self.limiter = RateLimiter(cfg.limits.rate.per_s, cfg.limits.rate.burst, cfg.limits.max_client_keys)
        self.store = PackStore(Path(cfg.state_dir))
        self.active = ActivePack(
            self.store,
            engine_factory(cfg.pack),
            cfg.pack.path,
            cfg.updates.ram_budget_mb,
            HealthBudget(latency_factor=cfg.updates.latency_factor),
            on_change=self._publish_status,
        )
        self.metrics = Metrics()  # the interval's counters; telemetry takes them
        self.telemetry: TelemetryService | None = None  # built in start(): it opens its spool
        self.updates = UpdateService(
            self.active,
            lambda: self.cfg.updates,
            Path(cfg.state_dir) / "tuf",
            self._update_event,
            fetcher,
        )
        self._hardware = tuple(sorted(hw.detect(cfg.updates.hardware).tags))  # reported in status
        self._ledger = Path(cfg.state_dir) / "instructions.json"  # signed seqs spent, per key
        self.authority: Authority | None = None  # built in start(): it reads key files
        handlers = Handlers(
            self.reply,
            self.status_report,
            self.reload,
            self.updates.handle,
            self.authorize,
            self.active.info,
            self._refused,
            self.metrics.request,
            self._telemetry_ack,
        )
        self.router = Router(lambda: self.cfg, self.hub, self.scheduler, self.limiter, handlers)
        self.homeassistant = Bridge(  # discovery entries, state, questions (agent/homeassistant.py)
            cfg,
            __version__,
            lambda: self.cfg.limits,
            self.limiter,
            self.scheduler,
            Ports(
                lambda topic, body, retain, wait_s: self.transport.publish(
                    topic, body, retain, wait_s=wait_s
                ),
                self.reply,
                lambda: self.transport.connected.is_set(),
                lambda: self.scheduler.depth,
                self._refused,
                self.metrics.request,
            ),
        )
        self.hybrid: Hybrid = OFF  # the escalation section, validated and built in start()
        self.answerer = Answerer(
            self.active,
            self.scheduler,
            self.hub,
            lambda: self.cfg,
            self.reply,
            self._answered,
            lambda: self.hybrid,
        )
        self.transport = MqttTransport(
            cfg.mqtt,
            cfg.device_id,
            self.router.subscriptions() + self.homeassistant.subscriptions(),
            on_connect=self._on_connect,
            max_packet_bytes=cfg.limits.max_packet_bytes,
            inbox_size=cfg.limits.inbox_size,
        )
        worker = threading.Thread(target=self.answerer.run, args=(self.stopping,), name="engine-worker")
        self.dispatcher = Dispatcher(
            self.transport.inbox, self._inbound, self.notifier, self.scheduler, worker
        )
        dispatch = threading.Thread(target=self.dispatcher.run, args=(self.stopping,), name="dispatcher")
        self._threads = [dispatch, worker]
        # publishes the entries or clears old ones; returns at once when there are none
        ha = threading.Thread(target=self.homeassistant.run, args=(self.stopping,), name="homeassistant")
        self._threads.append(ha)
        for t in self._threads:
            t.daemon = True

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Check the escalation section, tidy the store, load the active pack, then connect
        and serve. A bad ``escalation:`` value is ``bad_config`` here, before anything runs
        (agent/config.py cannot validate it: agent/answers/hybrid.py does, for start and reload)."""
        self.hybrid = hybrid_from(self.cfg.escalation)
        self.store.converge()
        self.authority = Authority(
            load_operator_keys(self.cfg.security.operator_keys),
            self.cfg.device_id,
            ReplayLedger(self._ledger),
        )
        self._interrupted = self.journal.recover()  # answered as soon as the broker is there
        self.active.boot()
        self._start_telemetry()
        self.hub.start()
        self.transport.set_will(self._will())
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
        self.notifier.ready(f"serving {self.active.label()}")
        self.stopping.wait()

    def stop(self) -> None:
        self.notifier.stopping()
        self.stopping.set()
        for job in self.scheduler.drain():
            self.reply(job.reply, error_reply(job.id, 0, Cancelled("the agent is shutting down")))
        self.hub.stop()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=5)
        self.transport.stop(last=(self.cfg.topic("status"), self._status_doc("offline")))
        self.journal.close()
        if self.telemetry is not None:
            self.telemetry.spool.close()

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and the pack; on any failure both stay as they were.
        The pack, prompt, per-request limits and operator keys apply at once; what
        was built from the config at start needs a restart (``config.restart_needed``), and the
        reply lists which of those changed."""
        cfg = load_config(self.config_path) if self.config_path else self.cfg
        hybrid = hybrid_from(cfg.escalation)  # a bad escalation section: nothing changes
        keys = load_operator_keys(cfg.security.operator_keys)  # a bad key file: nothing changes
        result = self.active.reload(engine_factory(cfg.pack))
        if self.authority is not None:
            self.authority = Authority(keys, self.authority.device_id, self.authority.ledger)
        restart = restart_needed(self.cfg, cfg)
        if cfg.homeassistant != self.cfg.homeassistant:  # its subscriptions are made at start
            restart.append("homeassistant")
        kept = {
            k: getattr(self.cfg, k) for k in ("mqtt", "sensors", "device_id", "state_dir", "homeassistant")
        }
        self.cfg = dataclasses.replace(cfg, **kept)
        self.hybrid = hybrid
        return {**result, "restart_needed_for": restart}

    # ------------------------------------------------------------ replies and status

    def reply(self, target: ReplyTo, body: dict[str, Any]) -> None:
        """Publish a reply; a publish that fails (a topic paho refuses) is logged and
        counted, never raised into the dispatcher or the worker."""
        try:
            self.transport.publish(target.topic, encode(body), correlation_data=target.correlation_data)
        except Exception as exc:
            self.reply_failures += 1
            log.warning("reply_failed", topic=repr(target.topic)[:200], reason=repr(exc)[:200])

    def _start_telemetry(self) -> None:
        """The spool opens (and is created) here; its thread joins the others."""
        t = self.cfg.telemetry
        if not t.enabled:
            return
        spool = Spool(Path(self.cfg.state_dir) / "telemetry.sqlite3", t.max_records, t.max_age_s)
        collect = Collector(
            self.metrics,
            __version__,
            Path(self.cfg.state_dir),
            self.active.info,
            lambda: self.scheduler.depth,
            lambda: self.transport.connects,
            lambda: self.reply_failures,
            spool.stats,
        )
        self.telemetry = TelemetryService(
            spool,
            self.cfg.device_id,
            self.cfg.topic("telemetry"),
            collect,
            lambda topic, body, wait_s: self.transport.publish(topic, body, wait_s=wait_s),
            self.transport.connected.is_set,
            t.interval_s,
            t.drain_rate,
            connections=lambda: self.transport.connects,
            ack=t.ack,
            ack_timeout_s=t.ack_timeout_s,
        )
        self.telemetry.event(self._boot_event())
        thread = threading.Thread(target=self.telemetry.run, args=(self.stopping,), name="telemetry")
        thread.daemon = True
        self._threads.append(thread)

    def _telemetry_ack(self, payload: bytes) -> None:
        """The fleet's ack (router: ``{root}/telemetry/ack``), to the spool's owner."""
        if self.telemetry is not None:
            self.telemetry.handle_ack(payload)

    def _boot_event(self) -> dict[str, Any]:
        """What this start found: the pack serving (or why none), and the store's last update
        outcome, which says ``rolled_back`` when this boot's first probe or a crash loop undid one."""
        last = self.store.state().last_outcome or None
        return {
            "event": "boot",
            "pack": self.active.info(),
            "pack_error": self.active.error,
            "agent_version": __version__,
            "last_update": {k: last.get(k) for k in ("state", "target", "reason_code")} if last else None,
        }

    def _update_event(self, event: dict[str, Any]) -> None:
        """An update event: published on ``update/status``; a state change (not download
        progress) is also kept as a telemetry event."""
        self.transport.publish(self.cfg.topic("update/status"), encode(event))
        if self.telemetry is not None and event["state"] != "downloading":
            keys = ("state", "target", "rollout_id", "reason_code")
            self.telemetry.event({"event": "update", **{k: event.get(k) for k in keys}})

    def reload_in_background(self) -> None:
        """``systemctl reload`` (SIGHUP): the same reload as the signed command, started off
        the signal handler; the outcome goes to the log."""

        def run() -> None:
            try:
                log.info("reloaded", trigger="SIGHUP", **self.reload())
            except Exception as exc:  # a bad config or pack: the old ones keep serving
                log.error("reload_failed", trigger="SIGHUP", reason=str(exc)[:300])

        threading.Thread(target=run, name="reload-sighup", daemon=True).start()

    def authorize(self, data: dict[str, Any], action: str) -> Instruction:
        """The one gate for privileged actions over MQTT (agent/authority.py)."""
        if self.authority is None:
            raise ModelUnavailable("the agent is starting")
        return self.authority.check(data, action)

    def _status_doc(self, state: str) -> bytes:
        return status_document(self.cfg.device_id, state, self.active.info(), self._hardware, self.cfg.tags)

    def _inbound(self, msg: Inbound) -> None:
        """Home Assistant's topics to its bridge, everything else to the router."""
        if not self.homeassistant.handle(msg):
            self.router.handle(msg)

    def _answered(self, a: Answered) -> None:
        self.metrics.answered(a)
        self.homeassistant.answered(a)

    def _on_connect(self) -> None:
        self._publish_status()
        self.homeassistant.connected_again()
        pending, self._interrupted = self._interrupted, []
        for p in pending:  # queries accepted by a run that crashed before answering them
            self.reply(p.reply, error_reply(p.id, 0, Interrupted("the agent restarted before answering")))

    def _refused(self, topic: str, why: str) -> None:
        self.reply_failures += 1
        log.warning("request_dropped", topic=repr(topic)[:200], reason=why)

    def _will(self) -> Will:
        return Will(self.cfg.topic("status"), self._status_doc("offline"))

    def _publish_status(self) -> None:
        """The retained birth document, again on every connect and every state change; the
        will follows the pack (the broker takes a new will at the next connect)."""
        transport = getattr(self, "transport", None)
        if transport is not None and transport.connected.is_set():
            transport.publish(self.cfg.topic("status"), self._status_doc(self.active.state), retain=True)
            transport.set_will(self._will())

    def _acks_refused(self) -> int:
        """Acks on ``{root}/telemetry/ack`` that were malformed or ahead of what was sent."""
        if self.telemetry is None:
            return 0
        return sum(n for outcome, n in self.telemetry.acks.items() if outcome not in ("advanced", "stale"))

    def status_report(self, client: str) -> dict[str, Any]:
        """Everything a client may see; request ids only of its own requests."""
        return {
            "state": self.active.state,
            "device_id": self.cfg.device_id,
            "pack": self.active.info(),
            "pack_error": self.active.error,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "queue_depth": self.scheduler.depth,
            "running": sorted(j.id for j in list(self.scheduler.running.values()) if j.owner == client),
            "sensors": self.hub.summary(),
            "packs": self.active.store_report(),
            "mqtt_connects": self.transport.connects,
            "routing": self.answerer.routing_counts(),
            "failures": {
                "handler": self.dispatcher.failures,
                "reply": self.reply_failures,
                "inbox_dropped": self.transport.dropped,
                "publish_refused": self.transport.publish_refused,
                "telemetry_acks_refused": self._acks_refused(),
            },
        }
