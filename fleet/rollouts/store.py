"""The rollouts' tables (fleet/telemetry/schema.py, migration 3): one owner of their writes.

Two kinds of writer:
- a person, through the API (create, pause, resume, abort, rollback): plain transactions
  that change a rollout's ``state`` only from the states that allow it;
- the one driver holding a rollout's lease: every one of its writes runs in
  :meth:`RolloutStore.fenced`, which first renews the lease in the same transaction and
  fails (:class:`LeaseLost`) when another driver took it. PostgreSQL locks the rollout row
  from that UPDATE until commit, and SQLite's BEGIN IMMEDIATE locks the database, so a
  person's pause and a driver's send are ordered: an instruction committed before the
  pause may still be published, none after it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, or_, select, update

from fleet.rollouts import states
from fleet.rollouts.errors import LeaseLost, RolloutError
from fleet.rollouts.spec import RolloutSpec
from fleet.telemetry import schema
from fleet.telemetry.store import TelemetryStore

RUNNING, PAUSED, HALTED, ABORTED, COMPLETED = "running", "paused", "halted", "aborted", "completed"
ROLLING_BACK, ROLLED_BACK = "rolling_back", "rolled_back"
ROLLOUT_STATES = (RUNNING, PAUSED, HALTED, ABORTED, COMPLETED, ROLLING_BACK, ROLLED_BACK)
# a driver follows these rollouts' devices (and sends for running and rolling_back ones only)
TRACKED = (RUNNING, ROLLING_BACK, PAUSED, HALTED)
# what a person may ask, and from which states
TRANSITIONS = {
    "pause": ((RUNNING,), PAUSED),
    "resume": ((PAUSED, HALTED), RUNNING),
    "abort": ((RUNNING, PAUSED, HALTED), ABORTED),
    "rollback": ((RUNNING, PAUSED, HALTED, ABORTED, COMPLETED), ROLLING_BACK),
}
R, W, D = schema.rollouts.c, schema.rollout_waves.c, schema.rollout_devices.c


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    spec: RolloutSpec
    state: str
    current_wave: int
    halt: dict[str, Any] | None
    overridden_waves: list[int]
    created_by: str
    created_at: float
    updated_at: float
    deadline: float
    lease_owner: str | None
    lease_until: float | None


@dataclass(frozen=True)
class Wave:
    wave: int
    size: int
    started_at: float | None
    completed_at: float | None
    soak_until: float | None


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    wave: int
    state: str
    reason_code: str | None
    reason: str | None
    from_pack: str | None
    envelope: str | None
    sent_at: float | None
    published_at: float | None
    activated_at: float | None
    confirmed_at: float | None
    updated_at: float
    rb_state: str | None
    rb_envelope: str | None
    rb_sent_at: float | None
    rb_published_at: float | None

    def public(self) -> dict[str, Any]:
        """What the API shows: not the signed envelopes."""
        return {
            k: getattr(self, k)
            for k in (
                "device_id",
                "wave",
                "state",
                "reason_code",
                "reason",
                "from_pack",
                "sent_at",
                "activated_at",
                "confirmed_at",
                "updated_at",
                "rb_state",
                "rb_sent_at",
            )
        }


class RolloutStore:
    def __init__(self, store: TelemetryStore, lease_s: float = 15.0) -> None:
        self.store, self.engine, self.lease_s = store, store.engine, lease_s

    # ------------------------------------------------------------------ a person's writes

    @staticmethod
    def new_id() -> str:
        return f"r-{secrets.token_hex(6)}"

    def create(
        self,
        rollout_id: str,
        spec: RolloutSpec,
        waves: Sequence[Sequence[str]],
        packs: dict[str, str | None],
        created_by: str,
        now: float,
    ) -> str:
        """A new running rollout (``rollout_id`` from :meth:`new_id`); wave 0 starts at the
        driver's next tick."""
        row = {
            "rollout_id": rollout_id,
            "target": spec.target,
            "selector": spec.selector,
            "spec": json.dumps(spec.to_json()),
            "state": RUNNING,
            "current_wave": 0,
            "halt": None,
            "overridden_waves": "[]",
            "created_by": created_by,
            "created_at": now,
            "updated_at": now,
            "deadline": now + spec.rules.deadline_s,
        }
        wave_rows = [{"rollout_id": rollout_id, "wave": i, "size": len(w)} for i, w in enumerate(waves)]
        device_rows = [
            {
                "rollout_id": rollout_id,
                "device_id": d,
                "wave": i,
                "state": states.PENDING,
                "from_pack": packs.get(d),
                "updated_at": now,
            }
            for i, w in enumerate(waves)
            for d in w
        ]
        with self.store.write() as conn:
            conn.execute(schema.rollouts.insert().values(row))
            conn.execute(schema.rollout_waves.insert(), wave_rows)
            conn.execute(schema.rollout_devices.insert(), device_rows)
        return rollout_id

    def request(self, rollout_id: str, action: str, now: float) -> Rollout:
        """pause, resume, abort or rollback, from the states that allow it (``bad_state``).
        Resuming a halted rollout accepts the halted wave's results: its rules are not
        checked again (``overridden_waves``). Aborting or rolling back marks the devices not
        yet sent ``aborted``: nothing more goes to them."""
        allowed, new_state = TRANSITIONS[action]
        with self.store.write() as conn:
            current = self._rollout(conn, rollout_id)
            if current.state not in allowed:
                raise RolloutError(
                    "bad_state",
                    f"cannot {action} a rollout that is {current.state} (from: {', '.join(allowed)})",
                )
            values: dict[str, Any] = {"state": new_state, "updated_at": now}
            if action == "resume" and current.halt is not None:
                values["overridden_waves"] = json.dumps(
                    sorted({*current.overridden_waves, current.halt["wave"]})
                )
                values["halt"] = None
            conn.execute(update(schema.rollouts).where(R.rollout_id == rollout_id).values(values))
            if action in ("abort", "rollback"):
                conn.execute(
                    update(schema.rollout_devices)
                    .where(D.rollout_id == rollout_id, D.state.in_((states.PENDING, states.OFFLINE_WAITING)))
                    .values(state=states.ABORTED, reason_code="aborted", updated_at=now)
                )
            return self._rollout(conn, rollout_id)

    # ------------------------------------------------------------------ reads

    def get(self, rollout_id: str) -> Rollout:
        with self.engine.connect() as conn:
            return self._rollout(conn, rollout_id)

    def recent(self, limit: int = 100) -> list[Rollout]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(schema.rollouts).order_by(R.created_at.desc()).limit(limit)).all()
        return [_rollout(r._mapping) for r in rows]

    def tracked(self) -> list[str]:
        """The rollouts a driver tracks now: those it may send for, those a person may carry
        on (paused, halted: their devices in flight still report), and aborted ones while a
        device is in flight. Completed and rolled back ones are done."""
        in_flight = (
            select(D.device_id)
            .where(D.rollout_id == R.rollout_id, D.state.in_(sorted(states.IN_FLIGHT)))
            .exists()
        )
        live = or_(R.state.in_(TRACKED), and_(R.state == ABORTED, in_flight))
        with self.engine.connect() as conn:
            return list(conn.execute(select(R.rollout_id).where(live)).scalars())

    def waves(self, rollout_id: str) -> list[Wave]:
        with self.engine.connect() as conn:
            return self._waves(conn, rollout_id)

    def devices(
        self, rollout_id: str, state: str | None = None, limit: int = 100_000, offset: int = 0
    ) -> list[DeviceRow]:
        query = select(schema.rollout_devices).where(D.rollout_id == rollout_id)
        if state is not None:
            query = query.where(D.state == state)
        query = query.order_by(D.wave, D.device_id).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_device(r._mapping) for r in conn.execute(query)]

    def counts(self, rollout_id: str) -> dict[int, dict[str, int]]:
        """wave -> state -> devices."""
        query = (
            select(D.wave, D.state, func.count()).where(D.rollout_id == rollout_id).group_by(D.wave, D.state)
        )
        out: dict[int, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for wave, state, n in conn.execute(query):
                out.setdefault(int(wave), {})[str(state)] = int(n)
        return out

    def view(self, rollout_id: str) -> dict[str, Any]:
        """The API's document of one rollout (docs/fleet.md#rollouts)."""
        r = self.get(rollout_id)
        by_wave = self.counts(rollout_id)
        totals: dict[str, int] = {}
        for c in by_wave.values():
            for s, n in c.items():
                totals[s] = totals.get(s, 0) + n
        return {
            "id": r.rollout_id,
            "target": r.spec.target,
            "selector": r.spec.selector,
            "waves_spec": r.spec.waves_text,
            "canary": list(r.spec.canary),
            "state": r.state,
            "created_by": r.created_by,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "deadline": r.deadline,
            "current_wave": r.current_wave,
            "rules": r.spec.rules.to_json(),
            "halt": r.halt,
            "overridden_waves": r.overridden_waves,
            "waves": [
                {
                    "index": w.wave,
                    "size": w.size,
                    "started_at": w.started_at,
                    "completed_at": w.completed_at,
                    "soak_until": w.soak_until,
                    "counts": _ordered(by_wave.get(w.wave, {})),
                }
                for w in self.waves(rollout_id)
            ],
            "counts": _ordered(totals),
            "driver": {"owner": r.lease_owner, "lease_until": r.lease_until},
        }

    # ------------------------------------------------------------------ the driver's lease

    def acquire(self, rollout_id: str, owner: str, now: float) -> bool:
        """Take (or keep) the lease of a tracked rollout whose lease is free or expired."""
        stmt = (
            update(schema.rollouts)
            .where(
                R.rollout_id == rollout_id,
                R.state.in_((*TRACKED, ABORTED)),
                or_(R.lease_owner.is_(None), R.lease_owner == owner, R.lease_until < now),
            )
            .values(lease_owner=owner, lease_until=now + self.lease_s)
        )
        with self.store.write() as conn:
            return bool(conn.execute(stmt).rowcount == 1)

    def release(self, rollout_id: str, owner: str) -> None:
        """Give the lease up (a clean stop), so another driver need not wait for it to expire."""
        stmt = (
            update(schema.rollouts)
            .where(R.rollout_id == rollout_id, R.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        )
        with self.store.write() as conn:
            conn.execute(stmt)

    @contextmanager
    def fenced(self, rollout_id: str, owner: str, now: float) -> Iterator[Connection]:
        """A write transaction that holds the lease: renewed first, or :class:`LeaseLost`."""
        stmt = (
            update(schema.rollouts)
            .where(R.rollout_id == rollout_id, R.lease_owner == owner, R.lease_until >= now)
            .values(lease_until=now + self.lease_s)
        )
        with self.store.write() as conn:
            if conn.execute(stmt).rowcount != 1:
                raise LeaseLost(f"rollout {rollout_id}: another driver holds the lease")
            yield conn

    # ------------------------------------------------------------------ the driver's writes

    def read(self, conn: Connection, rollout_id: str) -> tuple[Rollout, list[Wave], list[DeviceRow]]:
        rows = conn.execute(
            select(schema.rollout_devices).where(D.rollout_id == rollout_id).order_by(D.wave, D.device_id)
        )
        return (
            self._rollout(conn, rollout_id),
            self._waves(conn, rollout_id),
            [_device(r._mapping) for r in rows],
        )

    @staticmethod
    def set_devices(conn: Connection, rollout_id: str, changes: Sequence[dict[str, Any]]) -> None:
        """Each change: ``device_id`` and the columns to set (the same keys in every change)."""
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for change in changes:
            keys = tuple(sorted(k for k in change if k != "device_id"))
            by_keys.setdefault(keys, []).append(change)
        for keys, group in by_keys.items():
            stmt = (
                update(schema.rollout_devices)
                .where(and_(D.rollout_id == rollout_id, D.device_id == bindparam("_device")))
                .values({k: bindparam(f"_{k}") for k in keys})
            )
            conn.execute(stmt, [{"_device": c["device_id"], **{f"_{k}": c[k] for k in keys}} for c in group])

    @staticmethod
    def set_wave(conn: Connection, rollout_id: str, wave: int, **values: Any) -> None:
        conn.execute(
            update(schema.rollout_waves).where(W.rollout_id == rollout_id, W.wave == wave).values(values)
        )

    @staticmethod
    def set_rollout(conn: Connection, rollout_id: str, now: float, **values: Any) -> None:
        conn.execute(
            update(schema.rollouts).where(R.rollout_id == rollout_id).values(updated_at=now, **values)
        )

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _rollout(conn: Connection, rollout_id: str) -> Rollout:
        row = conn.execute(select(schema.rollouts).where(R.rollout_id == rollout_id)).first()
        if row is None:
            raise RolloutError("not_found", f"no rollout {rollout_id!r}")
        return _rollout(row._mapping)

    @staticmethod
    def _waves(conn: Connection, rollout_id: str) -> list[Wave]:
        rows = conn.execute(select(schema.rollout_waves).where(W.rollout_id == rollout_id).order_by(W.wave))
        return [Wave(r.wave, r.size, r.started_at, r.completed_at, r.soak_until) for r in rows]


def _rollout(m: Any) -> Rollout:
    return Rollout(
        m["rollout_id"],
        RolloutSpec.from_json(json.loads(m["spec"])),
        m["state"],
        int(m["current_wave"]),
        json.loads(m["halt"]) if m["halt"] else None,
        list(json.loads(m["overridden_waves"])),
        m["created_by"],
        m["created_at"],
        m["updated_at"],
        m["deadline"],
        m["lease_owner"],
        m["lease_until"],
    )


def _ordered(counts: dict[str, int]) -> dict[str, int]:
    return {s: counts[s] for s in states.STATES if counts.get(s)}


def _device(m: Any) -> DeviceRow:
    return DeviceRow(**{k: m[k] for k in DeviceRow.__dataclass_fields__})
