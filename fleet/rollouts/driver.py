"""The rollout driver: runs inside each fleet service process; for each rollout, the one
holding its lease acts (fleet/rollouts/store.py), the others wait for the lease to expire.

Each tick, for each rollout it holds: read what devices said (update events of this rollout
and of its rollback, the registry's online flag and pack), decide (decide.py), and commit the
decision with the signed envelopes of the instructions it sends, in one fenced transaction;
then publish them and record that the broker acknowledged each. A driver killed between
commit and publish leaves envelopes without ``published_at``; whoever holds the lease next
publishes those same bytes (a device that got them already refuses them as ``replayed``), so
no device gets two instructions for one step of a rollout.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence

import structlog
from sqlalchemy import Connection, and_, select

from fleet.rollouts import decide, states
from fleet.rollouts.errors import LeaseLost
from fleet.rollouts.rules import Samples
from fleet.rollouts.sender import Refusal, Signer
from fleet.rollouts.store import ROLLING_BACK, RUNNING, DeviceRow, Rollout, RolloutStore, Wave
from fleet.telemetry import schema
from fleet.telemetry.ingest import TRANSIENT

log = structlog.get_logger("fleet.rollouts.driver")
EVENT_SLACK_S = 30.0  # events are re-read this far back: workers commit out of receive order
REGRESSION_EVERY_S = 5.0  # how often a soaking wave's metrics are read again
# (topic, payload, "ROLLOUT_ID DEVICE_ID") -> acknowledged by the broker
Publish = Callable[[Sequence[tuple[str, str, str]]], list[bool]]
# the devices' error replies to this driver's instructions since the last call
Refusals = Callable[[], list[Refusal]]
IGNORED_REFUSALS = ("replayed",)  # a republished instruction the device had already acted on


class RolloutDriver:
    def __init__(
        self,
        rollouts: RolloutStore,
        signer: Signer,
        publish: Publish,
        refusals: Refusals,
        owner: str,
        topic_prefix: str = "edge",
        tick_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rollouts, self.signer, self.publish, self.owner = rollouts, signer, publish, owner
        self.refusals = refusals
        self._refused: dict[str, list[decide.Event]] = {}  # rollout -> refusals not yet folded in
        self.prefix, self.tick_s, self.clock = topic_prefix.strip("/"), tick_s, clock
        self._cursor: dict[str, float] = {}  # rollout -> newest event received_at folded
        self._judged: dict[str, float] = {}  # rollout -> when its metrics were last judged

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop``; then give the leases up so another driver need not wait."""
        held: set[str] = set()
        while not stop.wait(self.tick_s):
            held = self.tick()
        for rollout_id in held:
            with contextlib.suppress(*TRANSIENT):
                self.rollouts.release(rollout_id, self.owner)

    def tick(self) -> set[str]:
        """One pass over the rollouts; returns those whose lease this driver holds."""
        held: set[str] = set()
        try:
            driven = self.rollouts.tracked()
        except TRANSIENT as exc:
            log.warning("rollout_store_retry", error=str(exc).splitlines()[0][:200])
            return held
        for rollout_id in driven:
            try:
                if not self.rollouts.acquire(rollout_id, self.owner, self.clock()):
                    self._cursor.pop(rollout_id, None)  # another driver's: read all if it comes back
                    continue
                held.add(rollout_id)
                self.step(rollout_id)
            except LeaseLost:
                held.discard(rollout_id)
                self._cursor.pop(rollout_id, None)
                log.warning("rollout_lease_lost", rollout=rollout_id, owner=self.owner)
            except TRANSIENT as exc:
                log.warning("rollout_store_retry", rollout=rollout_id, error=str(exc).splitlines()[0][:200])
            except Exception:  # a bug must not stop the other rollouts
                log.exception("rollout_step_failed", rollout=rollout_id)
        return held

    def _take_refusals(self) -> None:
        for r in self.refusals():
            if r.code in IGNORED_REFUSALS:
                continue
            if not self._sent_token(r):
                log.warning("rollout_refusal_unverified", rollout=r.rollout_id[:80], device=r.device_id[:80])
                continue
            rollback = r.rollout_id.endswith(".rollback")
            rid = r.rollout_id.removesuffix(".rollback")
            event = decide.Event(r.device_id, rollback, "rejected", r.code, f"refused: {r.message}")
            self._refused.setdefault(rid, []).append(event)

    def _sent_token(self, r: Refusal) -> bool:
        """Whether ``r`` echoes the id of the instruction this rollout sent that device: a
        refusal forged by another client (it cannot know the id) is not acted on."""
        rollback = r.rollout_id.endswith(".rollback")
        rid = r.rollout_id.removesuffix(".rollback")
        d = schema.rollout_devices.c
        column = d.rb_envelope if rollback else d.envelope
        query = select(column).where(d.rollout_id == rid, d.device_id == r.device_id)
        with self.rollouts.engine.connect() as conn:
            envelope = conn.execute(query).scalar_one_or_none()
        if not envelope or not r.token:
            return False
        try:
            return bool(json.loads(envelope).get("id") == r.token)
        except ValueError:
            return False

    def step(self, rollout_id: str) -> None:
        self._take_refusals()
        events = self._events(rollout_id) + self._refused.pop(rollout_id, [])
        seen = self._seen(rollout_id)
        now = self.clock()
        with self.rollouts.fenced(rollout_id, self.owner, now) as conn:
            rollout, waves, devices = self.rollouts.read(conn, rollout_id)
            samples = self._samples_if_due(conn, rollout, waves, devices, now)
            decision = decide.decide(rollout, waves, devices, events, seen, now, samples)
            outgoing = self._sign(rollout, devices, decision)
            self._write(conn, rollout, decision, now)
        if decision.halt is not None:
            log.warning("rollout_halted", rollout=rollout_id, **decision.halt.to_json())
        if outgoing:
            self._publish(rollout_id, outgoing)

    # ------------------------------------------------------------ reading

    def _events(self, rollout_id: str) -> list[decide.Event]:
        u = schema.update_events.c
        since = self._cursor.get(rollout_id, 0.0) - EVENT_SLACK_S
        back = decide.rollback_id(rollout_id)
        query = (
            select(u.device_id, u.rollout_id, u.state, u.reason_code, u.reason, u.received_at)
            .where(u.rollout_id.in_((rollout_id, back)), u.received_at >= since)
            .order_by(u.ts, u.received_at)
        )
        with self.rollouts.engine.connect() as conn:
            rows = conn.execute(query).all()
        if rows:
            self._cursor[rollout_id] = max(r.received_at for r in rows)
        return [
            decide.Event(r.device_id, r.rollout_id == back, r.state, r.reason_code, r.reason) for r in rows
        ]

    def _seen(self, rollout_id: str) -> dict[str, decide.Seen]:
        d, rd = schema.devices.c, schema.rollout_devices.c
        query = select(d.device_id, d.online, d.pack_name, d.pack_version).join(
            schema.rollout_devices, and_(rd.device_id == d.device_id, rd.rollout_id == rollout_id)
        )
        with self.rollouts.engine.connect() as conn:
            return {
                r.device_id: decide.Seen(
                    bool(r.online),
                    f"{r.pack_name}@{r.pack_version}" if r.pack_name and r.pack_version else None,
                )
                for r in conn.execute(query)
            }

    def _samples_if_due(
        self, conn: Connection, rollout: Rollout, waves: list[Wave], devices: list[DeviceRow], now: float
    ) -> dict[str, Samples] | None:
        """The current wave's confirmed devices' metrics before and after, while it soaks
        (at most every REGRESSION_EVERY_S, and once more when the soak ends)."""
        last = self._judged.get(rollout.rollout_id, 0.0)
        every = min(REGRESSION_EVERY_S, rollout.spec.rules.soak_s / 4)
        if rollout.state != RUNNING or not decide.judging(waves, rollout.current_wave, now, last, every):
            return None
        self._judged[rollout.rollout_id] = now
        wave = [
            x
            for x in devices
            if x.wave == rollout.current_wave
            and x.state == states.CONFIRMED
            and x.sent_at is not None
            and x.confirmed_at is not None
        ]
        if not wave:
            return {}
        r = schema.records.c
        since = min(x.sent_at or now for x in wave) - rollout.spec.rules.baseline_s
        query = (
            select(r.device_id, r.data, r.received_at)
            .where(r.device_id.in_([x.device_id for x in wave]), r.kind == "metrics", r.received_at >= since)
            .limit(500_000)
        )
        by_device: dict[str, list[tuple[float, str]]] = {}
        for row in conn.execute(query):
            by_device.setdefault(row.device_id, []).append((row.received_at, row.data))
        return {
            x.device_id: _split(x, by_device.get(x.device_id, []), rollout.spec.rules.baseline_s)
            for x in wave
        }

    # ------------------------------------------------------------ writing and sending

    def _sign(
        self, rollout: Rollout, devices: list[DeviceRow], decision: decide.Decision
    ) -> list[tuple[str, str, bool]]:
        """(device, envelope, rollback) to publish: the new ones (their envelopes go into the
        decision, committed before publishing) and those committed earlier but never
        acknowledged, while the rollout is in the state that sends them."""
        out: list[tuple[str, str, bool]] = []
        rows = {x.device_id: x for x in devices}
        for device in decision.send:
            env = self.signer.update(device, rollout.rollout_id, rollout.spec.target)
            decision.set(device, envelope=env)
            out.append((device, env, False))
        back = decide.rollback_id(rollout.rollout_id)
        for device in decision.send_rollback:
            env = self.signer.update(device, back, rows[device].from_pack or "")
            decision.set(device, rb_envelope=env)
            out.append((device, env, True))
        for x in devices:
            if (
                rollout.state == RUNNING
                and x.envelope
                and x.published_at is None
                and x.device_id not in decision.send
            ):
                out.append((x.device_id, x.envelope, False))
            if (
                rollout.state == ROLLING_BACK
                and x.rb_envelope
                and x.rb_published_at is None
                and x.device_id not in decision.send_rollback
            ):
                out.append((x.device_id, x.rb_envelope, True))
        return out

    def _write(self, conn: Connection, rollout: Rollout, decision: decide.Decision, now: float) -> None:
        rid = rollout.rollout_id
        if decision.devices:
            self.rollouts.set_devices(conn, rid, [{"device_id": d, **v} for d, v in decision.devices.items()])
        for wave, values in decision.waves.items():
            self.rollouts.set_wave(conn, rid, wave, **values)
        if decision.halt is not None:
            decision.rollout["halt"] = json.dumps(decision.halt.to_json())
        if decision.rollout:
            self.rollouts.set_rollout(conn, rid, now, **decision.rollout)
            changed = {k: str(v)[:300] for k, v in decision.rollout.items() if k != "halt"}  # logged apart
            log.info("rollout_changed", rollout=rid, **changed)

    def _publish(self, rollout_id: str, outgoing: list[tuple[str, str, bool]]) -> None:
        back = decide.rollback_id(rollout_id)
        acked = self.publish(
            [
                (f"{self.prefix}/{device}/update", env, f"{back if rb else rollout_id} {device} {_id(env)}")
                for device, env, rb in outgoing
            ]
        )
        now = self.clock()
        done = [
            {"device_id": device, ("rb_published_at" if rb else "published_at"): now}
            for (device, _, rb), ok in zip(outgoing, acked, strict=True)
            if ok
        ]
        if len(done) < len(outgoing):
            log.warning("rollout_publish_incomplete", rollout=rollout_id, sent=len(done), of=len(outgoing))
        if done:
            with self.rollouts.fenced(rollout_id, self.owner, now) as conn:
                self.rollouts.set_devices(conn, rollout_id, done)
        log.info("rollout_sent", rollout=rollout_id, instructions=len(done))


def _id(envelope: str) -> str:
    """The signed instruction's id (random, 16 hex digits): the token its refusal must echo."""
    return str(json.loads(envelope).get("id", ""))


def _split(device: DeviceRow, rows: list[tuple[float, str]], baseline_s: float) -> Samples:
    """Before: the ``baseline_s`` up to its instruction; after: since it confirmed."""
    sent, confirmed = device.sent_at or 0.0, device.confirmed_at or 0.0
    before = [json.loads(d) for t, d in rows if sent - baseline_s <= t <= sent]
    after = [json.loads(d) for t, d in rows if t >= confirmed]
    return Samples(before, after)
