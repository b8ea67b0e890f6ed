"""``edge-fleet service``: one process running an ingest worker and the HTTP API.

Both halves only talk to the store, so the process is stateless: run several against one
PostgreSQL (each with its own ``--client-id``, one ``--group``) and put any load balancer in
front of their APIs. Without a broker URL it serves the API alone (a read replica).
uvicorn owns the main thread; SIGTERM or SIGINT ends it, and then the worker is stopped (its
message in hand stored and acked) after uvicorn has finished its requests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
import uvicorn

from fleet.api.app import create_app
from fleet.api.auth import TokenFile
from fleet.metrics import ServiceMetrics
from fleet.operators import signing_key
from fleet.rollouts.driver import RolloutDriver
from fleet.rollouts.sender import Publisher, Signer
from fleet.rollouts.store import RolloutStore
from fleet.telemetry.errors import TelemetryError
from fleet.telemetry.ingest import IngestConfig, IngestWorker, roll_quietly
from fleet.telemetry.queries import FleetQueries
from fleet.telemetry.store import TelemetryStore

log = structlog.get_logger("fleet.service")


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its shutdown, which would end the process
    before the ingest worker stops; here the signal only ends ``run()``, and the caller
    stops the worker and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass(frozen=True)
class ServiceConfig:
    db: str
    tokens: Path
    host: str = "127.0.0.1"
    port: int = 8090
    ingest: IngestConfig | None = None  # None: the API only
    roll_every_s: float = 60.0  # how often queued metrics records are folded into the rollups
    tls_cert: Path | None = None  # HTTPS with this certificate chain and key; bearer tokens
    tls_key: Path | None = None  # must not cross a network in clear
    signing_key: Path | None = None  # drive rollouts, signing their instructions with this key
    driver_tick_s: float = 1.0
    lease_s: float = 15.0  # a dead driver's rollouts wait this long for another

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise TelemetryError("--tls-cert and --tls-key go together")
        if self.signing_key is not None and self.ingest is None:
            raise TelemetryError("--signing-key drives rollouts over the broker: not with --api-only")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8090`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise TelemetryError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _roll_loop(store: TelemetryStore, every_s: float, stop: threading.Event) -> None:
    """Fold queued metrics records into the hourly rollups now and then; readers add what is
    still queued, so a slow or failed roll delays nothing but makes queries read more."""
    while not stop.wait(every_s):
        roll_quietly(store)


def _driver(cfg: ServiceConfig, store: TelemetryStore) -> tuple[RolloutDriver, Publisher] | None:
    """The rollout driver when a signing key is given; the key is loaded before anything runs."""
    if cfg.signing_key is None or cfg.ingest is None:
        return None
    signer = Signer(signing_key(cfg.signing_key))
    publisher = Publisher(cfg.ingest, f"{cfg.ingest.client_id}-driver"[:64])
    owner = f"{cfg.ingest.client_id}-{os.getpid()}"
    driver = RolloutDriver(
        RolloutStore(store, cfg.lease_s),
        signer,
        publisher.publish,
        publisher.refusals,
        owner,
        cfg.ingest.topic_prefix,
        cfg.driver_tick_s,
    )
    return driver, publisher


def run(cfg: ServiceConfig) -> None:
    tokens = TokenFile(cfg.tokens)  # a missing or broken token file stops start-up, before anything runs
    store = TelemetryStore.open(cfg.db)
    driving = _driver(cfg, store)
    worker = IngestWorker(cfg.ingest, store) if cfg.ingest is not None else None
    queries = FleetQueries(store.engine)
    snapshot = worker.counters.snapshot if worker is not None else None
    metrics = ServiceMetrics(snapshot, queries.gap_counts, queries.rollup_backlog)
    app = create_app(store, tokens, metrics)
    server = _Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_config=None,
            access_log=False,
            ssl_certfile=cfg.tls_cert,
            ssl_keyfile=cfg.tls_key,
        )
    )
    stop_rolling = threading.Event()
    roller = threading.Thread(target=_roll_loop, args=(store, cfg.roll_every_s, stop_rolling), daemon=True)
    if worker is not None:
        worker.on_write = metrics.observe_write
        worker.start()
    roller.start()
    driver_thread = None
    if driving is not None:
        driving[1].start()
        driver_thread = threading.Thread(target=driving[0].run, args=(stop_rolling,), daemon=True)
        driver_thread.start()
    log.info(
        "service_started",
        listen=f"{cfg.host}:{cfg.port}",
        ingest=worker is not None,
        driver=driving is not None,
    )
    try:
        server.run()
    finally:
        stop_rolling.set()
        roller.join(30)
        if driving is not None and driver_thread is not None:
            driver_thread.join(30)
            driving[1].stop()
        if worker is not None:
            worker.stop()
            log.info("ingest_stopped", **worker.counters.snapshot())
        store.close()
        log.info("service_stopped")
