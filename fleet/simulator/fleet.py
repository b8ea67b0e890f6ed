"""The in-process API: start N simulated devices on a broker, steer and inspect them.

    fleet = Fleet(SimConfig(broker=url, devices=20, operator_keys=(pub,), interval_s=1))
    fleet.start()                       # returns once every device is connected and subscribed
    fleet.take_offline(["sim-0003"])    # the will fires; fleet.bring_online(...) reverses it
    fleet.device("sim-0003").counters.instructions_received
    fleet.stop()                        # clean: every device publishes offline and disconnects

Every call goes through the loop thread (:meth:`EventLoop.call`), so what a test reads is a
consistent snapshot and never races a paho callback.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from fleet.simulator.config import SimConfig
from fleet.simulator.device import DeviceView, SimDevice
from fleet.simulator.fates import assign_fates, hardware_of, offline_devices
from fleet.simulator.loop import EventLoop
from fleet.simulator.updates import load_keys

log = structlog.get_logger("edge_fleet.simulator")
KEEPALIVE_EVERY_S = 5.0
SPARE_FDS = 256  # the loop, logs, the test's own clients


class SimulatorError(RuntimeError):
    """The simulated fleet did not reach the state asked for in time."""


def raise_nofile_limit(needed: int) -> int:
    """One socket per device: lift the soft open-files limit towards the hard one; returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("simulator_nofile_limit", needed=needed, soft=soft, hard=hard)
    return int(soft)


class Fleet:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.ids = config.device_ids()
        self.fates = assign_fates(config.seed, self.ids, config.shares)
        self.planned_offline = offline_devices(config.seed, self.ids, config.offline_share)
        self.loop = EventLoop()
        keys = load_keys(config.operator_keys)
        self._devices = {
            d: SimDevice(d, config, self.loop, keys, self.fates[d], self._hardware(d)) for d in self.ids
        }
        self.connect_s: float | None = None  # start() to every device ready
        self._started = False

    def _hardware(self, device_id: str) -> tuple[str, ...]:
        return hardware_of(self.config.seed, device_id, self.config.hardware)

    # ------------------------------------------------------------ life cycle

    def start(self, wait_s: float | None = 60.0) -> Fleet:
        """Boot every device, connect them at ``connect_rate`` a second and, unless ``wait_s``
        is None, wait until each is connected and subscribed (raises SimulatorError if not)."""
        raise_nofile_limit(len(self.ids) + SPARE_FDS)
        began = time.monotonic()
        self.loop.start()
        self._started = True
        self.loop.call(self._boot)
        if wait_s is not None:
            self.wait_ready(timeout_s=wait_s)
            self.connect_s = time.monotonic() - began
            log.info("simulator_connected", devices=len(self.ids), seconds=round(self.connect_s, 2))
        return self

    def _boot(self) -> None:
        pace = 1.0 / self.config.connect_rate
        for i, device in enumerate(self._devices.values()):
            device.boot()
            device.want_online = True  # meant to be online from now: wait_ready counts it
            self.loop.call_later(i * pace, device.connect)
        self.loop.call_later(KEEPALIVE_EVERY_S, self._keepalive)
        if self.planned_offline:
            self.loop.call_later(self.config.offline_after_s, self._planned_outage)

    def _keepalive(self) -> None:
        self.loop.call_later(KEEPALIVE_EVERY_S, self._keepalive)
        for device in self._devices.values():
            device.keepalive()

    def _planned_outage(self) -> None:
        """The offline share drops (the will fires), and comes back if ``offline_for_s``."""
        for d in sorted(self.planned_offline):
            self._devices[d].go_offline("kill")
        if self.config.offline_for_s > 0:
            back = sorted(self.planned_offline)
            self.loop.call_later(self.config.offline_for_s, lambda: self._online(back))

    def stop(self, timeout_s: float = 15.0) -> None:
        """The agent's clean stop on every device: an ``offline`` status, then DISCONNECT."""
        if not self._started:
            return
        self._started = False
        self.loop.call(lambda: self._offline(list(self._devices), "clean"))
        try:
            self._wait(lambda: all(d.client.socket() is None for d in self._devices.values()), timeout_s)
        except SimulatorError:
            still_open = self._count(lambda d: d.client.socket() is not None)
            log.warning("simulator_stop_incomplete", still_open=still_open)
        self.loop.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ steering

    def take_offline(self, ids: Iterable[str], mode: str = "kill") -> None:
        """``kill``: the connection drops without DISCONNECT, so the broker publishes the
        retained ``offline`` will; ``clean``: the device says ``offline`` and disconnects."""
        if mode not in ("kill", "clean"):
            raise ValueError("mode is 'kill' or 'clean'")
        chosen = self._known(ids)
        self.loop.call(lambda: self._offline(chosen, mode))

    def bring_online(self, ids: Iterable[str]) -> None:
        chosen = self._known(ids)
        self.loop.call(lambda: self._online(chosen))

    def _offline(self, ids: list[str], mode: str) -> None:
        for d in ids:
            self._devices[d].go_offline(mode)

    def _online(self, ids: list[str]) -> None:
        for d in ids:
            self._devices[d].go_online()

    def _known(self, ids: Iterable[str]) -> list[str]:
        chosen = list(ids)
        unknown = [d for d in chosen if d not in self._devices]
        if unknown:
            raise KeyError(f"no simulated devices {unknown[:5]}")
        return chosen

    # ------------------------------------------------------------ inspection

    def device(self, device_id: str) -> DeviceView:
        self._known([device_id])
        return self.loop.call(self._devices[device_id].view)

    def devices(self) -> list[DeviceView]:
        return self.loop.call(lambda: [d.view() for d in self._devices.values()])

    def with_fate(self, fate: str) -> list[str]:
        """The devices that will ``fail``, ``rollback``, ``regress``, ... on every update."""
        return [d for d in self.ids if self.fates[d] == fate]

    def totals(self) -> dict[str, Any]:
        """Every counter summed over the fleet (Counters merged), plus how many are connected."""
        out: dict[str, Any] = {}
        for view in self.devices():
            # not dataclasses.asdict: it rebuilds a Counter from its (key, count) pairs,
            # counting the pairs instead of copying the counts
            for name in (f.name for f in dataclasses.fields(view.counters)):
                value = getattr(view.counters, name)
                if isinstance(value, dict):
                    out[name] = out.get(name, Counter()) + Counter(value)
                else:
                    out[name] = out.get(name, 0) + value
        out = {k: dict(v) if isinstance(v, Counter) else v for k, v in out.items()}
        out["connected"] = self._count(lambda d: d.connected)
        out["loop_errors"] = self.loop.errors
        return out

    def wait_ready(self, ids: Iterable[str] | None = None, timeout_s: float = 60.0) -> None:
        """Until every device named (default: all that are meant to be online) is connected
        and subscribed."""
        chosen = self._known(ids) if ids is not None else None

        def ready() -> bool:
            names = chosen if chosen is not None else [d for d, v in self._devices.items() if v.want_online]
            return all(self._devices[d].ready for d in names)

        self._wait(ready, timeout_s, "devices did not all connect")

    def wait_offline(self, ids: Iterable[str], timeout_s: float = 15.0) -> None:
        chosen = self._known(ids)
        self._wait(lambda: all(self._devices[d].client.socket() is None for d in chosen), timeout_s)

    def _count(self, pred: Callable[[SimDevice], bool]) -> int:
        return int(self.loop.call(lambda: sum(1 for d in self._devices.values() if pred(d))))

    def _wait(self, done: Callable[[], bool], timeout_s: float, what: str = "timed out") -> None:
        deadline = time.monotonic() + timeout_s
        while not self.loop.call(done):
            if time.monotonic() > deadline:
                raise SimulatorError(f"{what} within {timeout_s}s")
            time.sleep(0.05)
