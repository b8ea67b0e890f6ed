"""IngestWorker: devices' telemetry, status and update events from the broker into the store.

Stateless apart from its broker session, so a fleet runs as many as it needs: they share
``{prefix}/+/telemetry`` and ``{prefix}/+/update/status`` through MQTT 5 shared
subscriptions (``$share/GROUP/...``), and the broker hands each message to one of them.

A message is acknowledged (PUBACK, paho's manual acks) only after the transaction that
stored it committed, and the session outlives the connection (clean_start false, a session
expiry), so a worker that is killed gets its unacknowledged messages again when it comes
back; storing them twice is harmless (the store is idempotent by device and seq). A message
that breaks the contract is counted, logged and acknowledged: sending it again would not
make it valid. A database that is down is retried, in order, until it answers.

Status documents are the exception to sharing: the MQTT 5 specification has a broker send
no retained messages to a shared subscription (mosquitto 2.0 sends them anyway, other
brokers follow the rule), and the registry needs the retained documents (who is online
now) when a worker starts. Every worker therefore subscribes to ``{prefix}/+/status`` itself;
they are few and small, and the store orders them by receive time.

paho's callbacks only queue; one thread stores and acks, in arrival order (MQTT wants
PUBACKs in the order the PUBLISHes came). The broker sends at most ``receive_maximum``
unacknowledged messages, which bounds the queue.

The thread takes the queued messages in batches (up to ``max_batch``, waiting at most
``max_wait_s`` for more), checks every one of them first (a bad message is refused alone),
stores a batch's telemetry in one transaction (``TelemetryStore.ingest_many``, the same
outcome as message by message) and acks the batch's messages in arrival order only after
that commit. A batch the database refuses for good (not a transient error) is stored again
message by message, so only the message at fault fails.

Then the worker acks the batch's devices, on ``{prefix}/{device}/telemetry/ack``, retained,
QoS 1, ``{"v": 1, "through_seq": N}``: every record up to N is stored (or a ``lost`` gap;
``TelemetryStore.acked_through``, read after the commit). The device deletes records only
then, because a broker's PUBACK is not delivery: a mosquitto restart drops what it
acknowledged but had not yet handed to this worker (its shared subscription does not survive
the restart), and the device sends the unacknowledged tail again. A thread of its own acks
(the storing thread only hands it the devices), a round at a time and at most a round per
``ack_every_s``: one query per round and at most one ack per device per round, however many
batches the round covers. Retained, so a
device that (re)subscribes gets its latest at once; a value this worker already published on
its current connection is not sent again (a device stuck behind an open gap, or sending
duplicates, costs no acks). An ack that cannot be computed or sent is logged and skipped: a
later round acks again, and the device resends after its ``telemetry.ack_timeout_s``.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from fleet.telemetry import retention
from fleet.telemetry.errors import InvalidPayload, TelemetryError
from fleet.telemetry.payloads import (
    Batch,
    StatusDoc,
    UpdateStatus,
    parse_status,
    parse_telemetry,
    parse_update_status,
    split_topic,
)
from fleet.telemetry.store import BatchResult, TelemetryStore

log = structlog.get_logger("fleet.telemetry.ingest")
T = TypeVar("T")

# The database did not answer (down, restarting, locked, a deadlock): the same write later may work.
TRANSIENT = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FAILED = object()  # a write that raised something other than TRANSIENT
_MAX_ACKED = 100_000  # devices whose last ack a worker remembers
_ACK_QUERY_DEVICES = 1000  # devices per ack query (an IN list of bound parameters)


@dataclass(frozen=True)
class IngestConfig:
    """One worker's broker side. ``client_id`` must be stable across restarts (it names the
    session whose unacknowledged messages come back) and unique among running workers."""

    broker_url: str
    group: str
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    topic_prefix: str = "edge"
    session_expiry_s: int = 86_400
    receive_maximum: int = 1000  # unacknowledged messages in flight: what a batch can hold
    max_packet_bytes: int = 256 * 1024  # the broker drops larger messages; up to it, we count them
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        url = urlparse(self.broker_url)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise TelemetryError(f"{self.broker_url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        for what, value in (("group", self.group), ("client id", self.client_id)):
            if not _NAME.fullmatch(value):
                raise TelemetryError(f"{what} {value!r}: 1-64 letters, digits, '.', '_' or '-'")
        if any(c in self.topic_prefix for c in "+#") or not self.topic_prefix.strip("/"):
            raise TelemetryError(f"topic prefix {self.topic_prefix!r}: a topic without wildcards")

    @property
    def tls(self) -> bool:
        return urlparse(self.broker_url).scheme == "mqtts" or self.ca_file is not None

    @property
    def host(self) -> str:
        return urlparse(self.broker_url).hostname or ""

    @property
    def port(self) -> int:
        return urlparse(self.broker_url).port or (8883 if self.tls else 1883)

    def ack_topic(self, device: str) -> str:
        return f"{self.topic_prefix.strip('/')}/{device}/telemetry/ack"

    def subscriptions(self) -> list[str]:
        prefix, shared = self.topic_prefix.strip("/"), f"$share/{self.group}/"
        return [f"{shared}{prefix}/+/telemetry", f"{shared}{prefix}/+/update/status", f"{prefix}/+/status"]


class Counters:
    """What a worker did since it started; read with :meth:`snapshot` from any thread."""

    def __init__(self, lag_window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.messages = 0  # messages handled, whatever the outcome
        self.records = 0  # telemetry records stored (new)
        self.duplicates = 0  # telemetry records already stored (redeliveries)
        self.invalid = 0  # messages refused as breaking the contract
        self.invalid_by_reason: Counter[str] = Counter()
        self.failed = 0  # messages an unexpected error stopped (logged with the error)
        self.retries = 0  # store attempts repeated because the database did not answer
        self.acks = 0  # telemetry acks published to devices
        self._lags: deque[float] = deque(maxlen=lag_window)

    def batch(self, result: BatchResult) -> None:
        with self._lock:
            self.records += result.stored
            self.duplicates += result.duplicates
            self._lags.extend(result.lags_s)

    def count(self, field: str, reason: str | None = None, n: int = 1) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + n)
            if reason is not None:
                self.invalid_by_reason[reason] += 1

    def lag_p95_s(self) -> float | None:
        """95th percentile of (received_at - record ts) over the last stored records; the
        device's clock is in it, so a board without a clock makes it meaningless."""
        with self._lock:
            lags = sorted(self._lags)
        return lags[min(len(lags) - 1, int(0.95 * len(lags)))] if lags else None

    def snapshot(self) -> dict[str, Any]:
        lag = self.lag_p95_s()
        with self._lock:
            return {
                "messages": self.messages,
                "records": self.records,
                "duplicates": self.duplicates,
                "invalid": self.invalid,
                "invalid_by_reason": dict(self.invalid_by_reason),
                "failed": self.failed,
                "retries": self.retries,
                "acks": self.acks,
                "lag_p95_s": lag,
            }


@dataclass(frozen=True)
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float
    connection: int  # which connection delivered it: only that one can acknowledge it


class IngestWorker:
    """``start()``, then ``stop()``; :attr:`counters` any time in between."""

    def __init__(
        self,
        cfg: IngestConfig,
        store: TelemetryStore,
        *,
        retry_max_s: float = 5.0,
        max_batch: int = 500,
        max_wait_s: float = 0.005,
        ack_every_s: float = 1.0,
    ) -> None:
        """``max_batch`` messages at most per transaction; ``max_wait_s``: how long a batch
        waits for more messages once the queue is empty (0: only what is queued);
        ``ack_every_s``: at most one round of telemetry acks per this many seconds."""
        self.cfg, self.store = cfg, store
        self._max_batch, self._max_wait_s = max(1, max_batch), max_wait_s
        self._ack_every_s = ack_every_s
        self.counters = Counters()
        self.subscribed = threading.Event()
        # metrics: for each stored message, the seconds its transaction (its batch's) took
        self.on_write: Callable[[float], None] | None = None
        self._retry_max_s = retry_max_s
        self._inbox: queue.Queue[_Inbound] = queue.Queue(maxsize=cfg.receive_maximum * 2)
        self._connection = 0
        self._ack_lock = threading.Lock()  # an ack and a new connection never interleave
        # device -> the telemetry ack last published on this connection: the same value again
        # is skipped (the broker retains it, and the device gets it on every subscription);
        # emptied on each new connection, since a restarted broker may have lost it
        self._acked: dict[str, int] = {}
        self._to_ack: dict[str, None] = {}  # devices stored since the acker's last round, in order
        self._to_ack_cv = threading.Condition()
        self._acker = threading.Thread(target=self._ack_loop, name="telemetry-ack", daemon=True)
        self._stopping = threading.Event()
        self._client = self._make_client()
        self._thread = threading.Thread(target=self._process_loop, name="telemetry-ingest", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; paho reconnects on its own, resuming the session."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.receive_maximum
        props.MaximumPacketSize = self.cfg.max_packet_bytes
        self._client.connect_async(
            self.cfg.host, self.cfg.port, self.cfg.keepalive_s, clean_start=False, properties=props
        )
        self._thread.start()
        self._acker.start()
        self._client.loop_start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the message in hand (stored and acked), then disconnect: what is still
        queued stays unacknowledged in the broker's session for the next start."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        with self._to_ack_cv:
            self._to_ack_cv.notify_all()
        if self._acker.is_alive():
            self._acker.join(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.cfg.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls:
            client.tls_set(ca_certs=self.cfg.ca_file, certfile=self.cfg.cert_file, keyfile=self.cfg.key_file)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # ------------------------------------------------------------ paho callbacks (its thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("ingest_connect_refused", reason=str(reason), broker=self.cfg.broker_url)
            return
        with self._ack_lock:
            self._connection += 1
            self._acked = {}
        client.subscribe([(t, SubscribeOptions(qos=1)) for t in self.cfg.subscriptions()])
        log.info(
            "ingest_connected",
            client_id=self.cfg.client_id,
            group=self.cfg.group,
            session_present=bool(getattr(flags, "session_present", False)),
        )

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        refused = [str(c) for c in codes if c.is_failure]
        if refused:
            log.error("ingest_subscribe_refused", reasons=refused, topics=self.cfg.subscriptions())
            return
        self.subscribed.set()
        log.info("ingest_subscribed", topics=self.cfg.subscriptions())

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.subscribed.clear()
        if not self._stopping.is_set():
            log.warning("ingest_disconnected", reason=str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        item = _Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.time(), self._connection)
        while not self._stopping.is_set():  # a full inbox holds paho back: backpressure to the broker
            try:
                self._inbox.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # ------------------------------------------------------------ the storing thread

    def _process_loop(self) -> None:
        while not self._stopping.is_set():
            items = self._next_batch()
            if items and self._handle_batch(items):
                self._ack_all(items)
                self._queue_acks(items)

    def _next_batch(self) -> list[_Inbound]:
        """The queued messages of the current connection, up to ``max_batch``: what is
        queued now, and for at most ``max_wait_s`` more, what comes next."""
        try:
            first = self._inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        items, deadline = [first], time.monotonic() + self._max_wait_s
        while len(items) < self._max_batch:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    items.append(self._inbox.get(timeout=left))
                except queue.Empty:
                    break
        # its connection is gone: the broker sends it again on the new one
        return [item for item in items if item.connection == self._connection]

    def _handle_batch(self, items: list[_Inbound]) -> bool:
        """True when every message of the batch is done with (stored, refused, or failed
        for good) and may be acknowledged; False when the worker stops while the database
        is still away (then none is). Every message is checked before any transaction, so
        a bad one is refused alone; the telemetry is stored in one transaction, and if the
        database refuses that one for good, message by message."""
        telemetry: list[tuple[_Inbound, Batch]] = []
        others: list[tuple[_Inbound, StatusDoc | UpdateStatus]] = []
        for item in items:
            try:
                device, leaf = split_topic(item.topic, self.cfg.topic_prefix)
                if leaf == "telemetry":
                    telemetry.append((item, parse_telemetry(device, item.payload)))
                elif leaf == "status":
                    doc = parse_status(device, item.payload)
                    if doc is None:
                        log.info("device_status_cleared", device=device)
                    else:
                        others.append((item, doc))
                elif leaf == "update/status":
                    others.append((item, parse_update_status(device, item.payload)))
                else:
                    raise InvalidPayload("bad_topic", f"no telemetry topic: {item.topic!r}")
            except InvalidPayload as exc:
                self.counters.count("invalid", exc.reason)
                log.warning("telemetry_invalid", topic=item.topic[:200], reason=exc.reason, error=exc.message)
            except Exception:  # a bug: never stop ingesting
                self.counters.count("failed")
                log.exception("telemetry_ingest_failed", topic=item.topic)
        if others:
            pairs = [(m, item.received_at) for item, m in others]
            if not self._store_all([item.topic for item, _ in others], pairs, self.store.record_many):
                return False
        if telemetry:
            pairs_t = [(batch, item.received_at) for item, batch in telemetry]
            if not self._store_all([item.topic for item, _ in telemetry], pairs_t, self._ingest_counted):
                return False
        return True

    def _ingest_counted(self, pairs: Sequence[tuple[Batch, float]]) -> list[BatchResult]:
        results = self.store.ingest_many(pairs)
        for result in results:
            self.counters.batch(result)
        return results

    def _store_all(
        self,
        topics: list[str],
        pairs: Sequence[tuple[T, float]],
        write_many: Callable[[Sequence[tuple[T, float]]], object],
    ) -> bool:
        """All ``pairs`` in one transaction (``write_many``); if the database refuses it for
        good, one by one, so only the message at fault fails. False when the worker stops
        while the database is away (then none of them counts as done)."""
        outcome = self._durably(topics[0], partial(write_many, pairs), quiet=True, messages=len(pairs))
        if outcome is None:
            return False
        if outcome is not _FAILED:
            return True
        for topic, pair in zip(topics, pairs, strict=True):  # find the message(s) at fault
            if self._durably(topic, partial(write_many, [pair])) is None:
                return False
        return True

    def _durably(
        self, topic: str, write: Callable[[], object], *, quiet: bool = False, messages: int = 1
    ) -> object:
        """``write()``'s result once it succeeded, retrying while the database does not
        answer; ``_FAILED`` when it raised another error (logged and counted as failed unless
        ``quiet``: the caller tries another way); None when the worker stops first. The
        write's time is observed once for each of the ``messages`` it stored: the time each
        of them took to store."""
        delay = 0.1
        while True:
            try:
                started = time.perf_counter()
                result = write()
                if self.on_write is not None:
                    took = time.perf_counter() - started
                    for _ in range(messages):
                        self.on_write(took)
                return result
            except TRANSIENT as exc:
                self.counters.count("retries")
                log.warning("telemetry_store_retry", topic=topic, error=str(exc).splitlines()[0])
                if self._stopping.wait(delay):
                    return None
                delay = min(delay * 2, self._retry_max_s)
            except Exception:  # a bug, or data the database refuses: never stop ingesting
                if quiet:
                    log.warning("telemetry_batch_refused", exc_info=True)
                else:
                    self.counters.count("failed")
                    log.exception("telemetry_ingest_failed", topic=topic)
                return _FAILED

    def _queue_acks(self, items: list[_Inbound]) -> None:
        """Hand the batch's telemetry devices to the acker thread (after the commit). The
        storing thread does no ack work itself: measured with bench/fleet.py (1,000 devices),
        a query and the publishes after every batch on this thread cost 15 to 40 % of the
        ingest rate; in rounds on their own thread about 15 %."""
        devices = []
        for item in items:
            try:
                device, leaf = split_topic(item.topic, self.cfg.topic_prefix)
            except InvalidPayload:
                continue
            if leaf == "telemetry":
                devices.append(device)
        if devices:
            with self._to_ack_cv:
                self._to_ack.update(dict.fromkeys(devices))
                self._to_ack_cv.notify()

    def _ack_loop(self) -> None:
        """Each round takes every device stored since the last one, and rounds are at least
        ``ack_every_s`` apart: a device draining a backlog (many messages a second) gets one
        ack a round, not one per message, and an idle worker acks the next message at once.
        A device waits ``telemetry.ack_timeout_s`` (120 s) before it sends again: a second
        of delay costs it nothing."""
        while not self._stopping.is_set():
            with self._to_ack_cv:
                while not self._to_ack and not self._stopping.is_set():
                    self._to_ack_cv.wait(0.5)
            started = time.monotonic()
            self._ack_round()
            self._stopping.wait(max(0.0, started + self._ack_every_s - time.monotonic()))
        self._ack_round()  # what the last batches stored, before the worker disconnects

    def _ack_round(self) -> None:
        with self._to_ack_cv:
            devices, self._to_ack = list(self._to_ack), {}
        for start in range(0, len(devices), _ACK_QUERY_DEVICES):
            self._ack_devices(devices[start : start + _ACK_QUERY_DEVICES])

    def _ack_devices(self, devices: list[str]) -> None:
        """Tell each device how far the store has it (read now, after its records' commit).
        Never raises: a missed ack is sent by a later round, and the device sends again when
        acks stop."""
        try:
            through = self.store.acked_through(devices)
        except TRANSIENT as exc:
            log.warning("telemetry_ack_skipped", devices=len(devices), error=str(exc).splitlines()[0][:300])
            return
        except Exception:
            log.exception("telemetry_ack_failed", devices=len(devices))
            return
        with self._ack_lock:  # this connection's memory; publishing below holds no lock
            acked = self._acked  # the storing thread's PUBACKs must not wait for the acks
            if len(acked) > _MAX_ACKED:  # a bound on memory: forgetting costs one repeated ack
                acked.clear()
            fresh = sorted((d, seq) for d, seq in through.items() if acked.get(d) != seq)
        for device, seq in fresh:
            body = b'{"v":1,"through_seq":%d}' % seq
            self._client.publish(self.cfg.ack_topic(device), body, qos=1, retain=True)
            acked[device] = seq  # after a reconnect meanwhile: into the old memory, dropped with it
        self.counters.count("acks", n=len(fresh))

    def _ack_all(self, items: list[_Inbound]) -> None:
        """PUBACK each, in arrival order, after the batch is done with."""
        with self._ack_lock:
            for item in items:
                if item.connection == self._connection:
                    self._client.ack(item.mid, item.qos)
        for _ in items:
            self.counters.count("messages")


def roll_quietly(store: TelemetryStore) -> None:
    """One roll; a database that does not answer is retried at the next tick, and a bug is
    logged, never allowed to stop ingest."""
    try:
        folded = retention.roll(store)
        if folded:
            log.debug("rollup_rolled", records=folded)
    except TRANSIENT as exc:
        log.warning("rollup_retry", error=str(exc).splitlines()[0][:300])
    except Exception:
        log.exception("rollup_failed")


def serve(cfg: IngestConfig, where: str, stop: threading.Event, stats_every_s: float = 60.0) -> Counters:
    """Run one worker on store ``where`` until ``stop`` is set; logs its counters now and
    then and at the end, and returns them. At each of those ticks it also folds the queued
    metrics records into the hourly rollups (retention.roll; one worker at a time does), so
    a fleet run with ``edge-fleet ingest`` alone keeps its rollups current too."""
    store = TelemetryStore.open(where)
    worker = IngestWorker(cfg, store)
    worker.start()
    try:
        while not stop.wait(stats_every_s):
            log.info("ingest_stats", **worker.counters.snapshot())
            roll_quietly(store)
    finally:
        worker.stop()
        store.close()
        log.info("ingest_stopped", **worker.counters.snapshot())
    return worker.counters
