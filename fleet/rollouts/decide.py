"""One driver tick for one rollout, decided without IO: from what the store holds (the rollout,
its waves and devices), what the devices said (update events, registry), and the clock, to
what must change and which devices get an instruction now. driver.py reads, calls
:func:`decide`, and writes the :class:`Decision` in one fenced transaction.

Order within a tick: fold in events and statuses; time out what waits too long; check the
halt rules; only then, and only while ``running`` (``rolling_back`` for rollbacks), start
waves and pick devices to send to. A tick that halts sends nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.rollouts import rules, states
from fleet.rollouts.rules import Halt, Samples
from fleet.rollouts.store import (
    COMPLETED,
    HALTED,
    ROLLED_BACK,
    ROLLING_BACK,
    RUNNING,
    DeviceRow,
    Rollout,
    Wave,
)


@dataclass(frozen=True)
class Event:
    """An update event of this rollout (``rollback``: of its rollback) from one device."""

    device_id: str
    rollback: bool
    state: str
    reason_code: str | None
    reason: str | None


@dataclass(frozen=True)
class Seen:
    """What the registry says of a device now."""

    online: bool
    pack: str | None  # NAME@VERSION serving


@dataclass
class Decision:
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> columns to set
    waves: dict[int, dict[str, Any]] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)
    send: list[str] = field(default_factory=list)
    send_rollback: list[str] = field(default_factory=list)
    halt: Halt | None = None

    def set(self, device: str, **values: Any) -> None:
        self.devices.setdefault(device, {}).update(values)


def rollback_id(rollout_id: str) -> str:
    """The ``rollout_id`` a rollback's instructions carry, so its events are told apart."""
    return f"{rollout_id}.rollback"


def judging(waves: Sequence[Wave], current: int, now: float, last_judged: float, every_s: float) -> bool:
    """Whether the current wave's metrics are to be judged now: while it soaks, every
    ``every_s``, and always on the tick its soak ends (the one that would start the next wave)."""
    w = waves[current] if current < len(waves) else None
    if w is None or w.completed_at is None:
        return False
    return (w.soak_until or 0) <= now or now - last_judged >= every_s


def decide(
    rollout: Rollout,
    waves: Sequence[Wave],
    devices: Sequence[DeviceRow],
    events: Sequence[Event],
    seen: Mapping[str, Seen],
    now: float,
    samples: Mapping[str, Samples] | None = None,
) -> Decision:
    tick = _Tick(rollout, waves, devices, seen, now)
    tick.fold(events)
    tick.confirm()
    tick.time_out()
    if rollout.state == RUNNING:
        tick.check_halt(samples)
        if tick.out.halt is None:
            tick.advance()
    elif rollout.state == ROLLING_BACK:
        tick.roll_back()
    return tick.out


class _Tick:
    def __init__(
        self,
        rollout: Rollout,
        waves: Sequence[Wave],
        devices: Sequence[DeviceRow],
        seen: Mapping[str, Seen],
        now: float,
    ) -> None:
        self.r, self.waves, self.seen, self.now = rollout, list(waves), seen, now
        self.rules = rollout.spec.rules
        self.dev = {d.device_id: d for d in devices}
        self.state = {d.device_id: d.state for d in devices}  # as changed by this tick
        self.rb = {d.device_id: d.rb_state for d in devices}
        self.out = Decision()

    # ------------------------------------------------------------ what happened

    def _move(self, device: str, new: str, **extra: Any) -> None:
        if self.state[device] != new:
            self.state[device] = new
            self.out.set(device, state=new, updated_at=self.now, **extra)

    def _move_rb(self, device: str, new: str, **extra: Any) -> None:
        if self.rb[device] != new:
            self.rb[device] = new
            self.out.set(device, rb_state=new, updated_at=self.now, **extra)

    def fold(self, events: Sequence[Event]) -> None:
        for e in events:
            if e.device_id not in self.dev:
                continue
            if e.rollback:
                current = self.rb[e.device_id]
                if current is not None:
                    new = states.after_event(current, e.state, e.reason_code)
                    self._move_rb(e.device_id, new, **self._why(current, new, e))
                continue
            current = self.state[e.device_id]
            new = states.after_event(current, e.state, e.reason_code)
            extra = self._why(current, new, e)
            if new == states.ACTIVATED and current != new:
                extra["activated_at"] = self.now
            self._move(e.device_id, new, **extra)

    @staticmethod
    def _why(current: str, new: str, e: Event) -> dict[str, Any]:
        if new != current and new in (states.FAILED, states.ROLLED_BACK, states.SKIPPED):
            return {"reason_code": e.reason_code, "reason": (e.reason or "")[:500] or None}
        return {}

    def confirm(self) -> None:
        """A device whose status names the target has it (its first probe passed)."""
        for device, state in self.state.items():
            pack = self.seen[device].pack if device in self.seen else None
            if state in states.IN_FLIGHT and pack == self.r.spec.target:
                self._move(device, states.CONFIRMED, confirmed_at=self.now)
            rb = self.rb[device]
            if rb in states.IN_FLIGHT and pack is not None and pack == self.dev[device].from_pack:
                self._move_rb(device, states.CONFIRMED)

    def time_out(self) -> None:
        for device, state in self.state.items():
            d = self.dev[device]
            if state in (states.SENT, states.DOWNLOADING) and d.published_at is not None:
                if self.now - d.published_at > self.rules.response_timeout_s:
                    self._move(
                        device, states.FAILED, reason_code="no_response", reason="no update event in time"
                    )
            elif (
                state == states.ACTIVATED
                and self.now - (d.activated_at or self.now) > self.rules.confirm_timeout_s
            ):
                self._move(
                    device,
                    states.FAILED,
                    reason_code="not_confirmed",
                    reason="activated, never reported serving it",
                )
            elif state == states.OFFLINE_WAITING and self.now > self.r.deadline:
                self._move(
                    device, states.EXPIRED, reason_code="deadline", reason="offline until the deadline"
                )
            rb = self.rb[device]
            rb_out = d.rb_published_at
            if (
                rb in (states.SENT, states.DOWNLOADING)
                and rb_out
                and self.now - rb_out > self.rules.response_timeout_s
            ):
                self._move_rb(device, states.FAILED)
            elif rb == states.OFFLINE_WAITING and self.now > self.r.deadline:
                self._move_rb(device, states.EXPIRED)

    # ------------------------------------------------------------ halting

    def check_halt(self, samples: Mapping[str, Samples] | None) -> None:
        for w in self.waves:
            if w.started_at is None or w.wave in self.r.overridden_waves:
                continue
            wave_states = {d: s for d, s in self.state.items() if self.dev[d].wave == w.wave}
            halt = rules.failure_rate(w.wave, wave_states, self.rules)
            if halt is None and samples is not None and w.wave == self.r.current_wave:
                halt = rules.regression(w.wave, samples, self.rules)
            if halt is not None:
                self.out.halt = Halt(halt.rule, halt.wave, halt.devices, halt.figures, halt.message, self.now)
                self.out.rollout.update(state=HALTED)
                return

    # ------------------------------------------------------------ moving on

    def advance(self) -> None:
        """Send to returning devices, start the current wave, end its soak, finish."""
        for device, state in self.state.items():
            if state == states.OFFLINE_WAITING and self._online(device):
                self._send(device)
        current = self.waves[self.r.current_wave]
        if current.started_at is None:
            self._start(current)
            return
        members = [d for d, row in self.dev.items() if row.wave == current.wave]
        settled = all(
            self.state[d] in states.FINAL or self.state[d] == states.OFFLINE_WAITING for d in members
        )
        if current.completed_at is None:
            if settled:
                self.out.waves[current.wave] = {
                    "completed_at": self.now,
                    "soak_until": self.now + self.rules.soak_s,
                }
            return
        if (current.soak_until or 0) > self.now:
            return
        if current.wave + 1 < len(self.waves):
            self.out.rollout.update(current_wave=current.wave + 1)
            self._start(self.waves[current.wave + 1])
        elif not any(s in states.IN_FLIGHT or s == states.OFFLINE_WAITING for s in self.state.values()):
            self.out.rollout.update(state=COMPLETED)

    def _start(self, wave: Wave) -> None:
        self.out.waves[wave.wave] = {"started_at": self.now}
        for device, row in self.dev.items():
            if row.wave != wave.wave or self.state[device] != states.PENDING:
                continue
            if self.seen.get(device, Seen(False, None)).pack == self.r.spec.target:
                self._move(device, states.CONFIRMED, reason_code="already_current", confirmed_at=self.now)
            elif self._online(device):
                self._send(device)
            else:
                self._move(device, states.OFFLINE_WAITING)

    def _send(self, device: str) -> None:
        self._move(device, states.SENT, sent_at=self.now)
        self.out.send.append(device)

    def _online(self, device: str) -> bool:
        seen = self.seen.get(device)
        return seen is not None and seen.online

    # ------------------------------------------------------------ rolling back

    def _took_new(self, device: str) -> bool:
        """It runs the target because of this rollout (not one that had it already)."""
        return self.state[device] in states.TOOK_NEW and self.dev[device].reason_code != "already_current"

    def roll_back(self) -> None:
        """Every device that took the new pack goes back to the one it had; the rollout is
        rolled back once none is in flight either way."""
        for device in self.state:
            rb = self.rb[device]
            if self._took_new(device) and rb is None:
                if self.dev[device].from_pack is None:
                    self._move_rb(device, states.FAILED, reason_code="no_previous_pack")
                elif self._online(device):
                    self._send_rollback(device)
                else:
                    self._move_rb(device, states.OFFLINE_WAITING)
            elif rb == states.OFFLINE_WAITING and self._online(device):
                self._send_rollback(device)
        busy = any(
            s in (states.SENT, states.DOWNLOADING)
            or (self._took_new(d) and (self.rb[d] is None or self.rb[d] not in states.FINAL))
            for d, s in self.state.items()
        )
        if not busy:
            self.out.rollout.update(state=ROLLED_BACK)

    def _send_rollback(self, device: str) -> None:
        self._move_rb(device, states.SENT, rb_sent_at=self.now)
        self.out.send_rollback.append(device)
