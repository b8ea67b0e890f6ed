"""What a simulated fleet is: how many devices, where they connect, how they misbehave.

One frozen value for the whole fleet, so the CLI, a test and the simulator agree on every
knob, and a device's behaviour follows from (config, device id) alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from model_packs import layout

DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what the fleet's ingest accepts as a device id
TOPIC_PREFIX = re.compile(r"[^#+\x00]{1,128}")


class ConfigError(ValueError):
    """A simulator setting that cannot work; the message names it."""


@dataclass(frozen=True)
class Shares:
    """Fractions of the fleet that misbehave on every update, disjoint (a device has at most
    one fate): ``fail`` is rejected by the health gate, ``rollback`` activates then rolls back,
    ``regress`` activates and gets slower, ``incompatible`` is rejected before downloading."""

    fail: float = 0.0
    rollback: float = 0.0
    regress: float = 0.0
    incompatible: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fail", "rollback", "regress", "incompatible"):
            _check_share(name, getattr(self, name))
        if self.fail + self.rollback + self.regress + self.incompatible > 1.0 + 1e-9:
            raise ConfigError("fail + rollback + regress + incompatible shares add up to more than 1")


def _check_share(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{name} share must be between 0 and 1, not {value}")


@dataclass(frozen=True)
class SimConfig:
    """Every knob of a simulated fleet (defaults: a real agent's timings where it has them)."""

    broker: str = "mqtt://127.0.0.1:1883"
    devices: int = 10
    id_prefix: str = "sim-"
    id_start: int = 1
    topic_prefix: str = "edge"
    password: str | None = None  # set: every device logs in as its own id with this password
    operator_keys: tuple[Path, ...] = ()  # PEM public keys, like security.operator_keys
    interval_s: float = 60.0  # telemetry.interval_s
    step_delay_s: float = 0.5  # between two update events
    download_steps: int = 4  # downloading events after the 0 % one
    hardware: tuple[tuple[str, float], ...] = (("x86_64", 1.0),)  # (tags joined by '+', weight)
    tags: tuple[str, ...] = ()
    pack: str = "smollm2-135m-instruct@1.0.0"
    agent_version: str = "0.1.0"
    seed: int = 0
    shares: Shares = field(default_factory=Shares)
    regress_factor: float = 0.5  # tokens/s times this, ttft and latency divided by it
    offline_share: float = 0.0
    offline_after_s: float = 5.0  # the offline share drops (will fires) this long after start
    offline_for_s: float = 0.0  # and comes back after this long; 0: stays away
    rollback_targets: tuple[str, ...] = ()  # targets the simulated repository signed as rollbacks
    connect_rate: float = 500.0  # new connections a second, to spare the broker a storm
    keepalive_s: int = 60
    session_expiry_s: int = 3600
    max_records: int = 200  # unacknowledged telemetry records a device keeps (~700 bytes each)
    ack_mode: str = "fleet"  # telemetry.ack: "fleet" (the fleet's acks) or "broker" (PUBACK)
    ack_timeout_s: float = 120.0  # sent, and no ack advanced for this long: send again
    resend_delay_s: float = 0.5  # after a (re)connect: time for the retained ack to arrive
    reply_topics: tuple[str, ...] = ("edge-ops/#",)  # replies.allowed_topics

    def __post_init__(self) -> None:
        host_port(self.broker)
        if self.devices < 1 or self.id_start < 0:
            raise ConfigError("devices must be at least 1, the first number not negative")
        if not DEVICE_ID.fullmatch(self.device_ids()[-1]) or not TOPIC_PREFIX.fullmatch(self.topic_prefix):
            raise ConfigError("device ids are [A-Za-z0-9._-], at most 64; the topic prefix has no + or #")
        if not (self.interval_s > 0 and self.step_delay_s >= 0 and self.resend_delay_s >= 0):
            raise ConfigError("interval must be positive, step delay and resend delay not negative")
        if self.download_steps < 0 or self.max_records < 3 or self.connect_rate <= 0:
            raise ConfigError("download steps >= 0, max records >= 3, connect rate > 0")
        if self.ack_mode not in ("fleet", "broker") or not self.ack_timeout_s > 0:
            raise ConfigError("ack mode is 'fleet' or 'broker'; the ack timeout must be positive")
        if not 0.0 < self.regress_factor <= 1.0:
            raise ConfigError("regress factor must be in (0, 1]: it makes the device slower")
        _check_share("offline", self.offline_share)
        if not self.hardware or any(w < 0 for _, w in self.hardware) or sum(w for _, w in self.hardware) <= 0:
            raise ConfigError("hardware mix needs at least one entry with a positive weight")
        for target in (self.pack, *self.rollback_targets):
            try:
                layout.parse_target(target)
            except layout.TargetError as exc:
                raise ConfigError(str(exc)) from None

    def device_ids(self) -> list[str]:
        """``sim-0001`` ...: zero-padded so the ids sort in creation order."""
        width = max(4, len(str(self.id_start + self.devices - 1)))
        return [f"{self.id_prefix}{n:0{width}d}" for n in range(self.id_start, self.id_start + self.devices)]

    def root(self, device_id: str) -> str:
        return f"{self.topic_prefix.rstrip('/')}/{device_id}"


def host_port(url: str) -> tuple[str, int]:
    """``mqtt://HOST[:PORT]`` -> (host, port). Plain TCP only: the simulator has no TLS."""
    parsed = urlparse(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        raise ConfigError(f"broker {url!r}: expected mqtt://HOST[:PORT] (no TLS in the simulator)")
    return parsed.hostname, parsed.port or 1883


def parse_hardware(text: str) -> tuple[tuple[str, float], ...]:
    """``x86_64:0.5,aarch64+aarch64-dotprod:0.5`` -> ((tags, weight), ...); a weight defaults
    to 1. A device's tags are the entry split at ``+`` (see :func:`hardware_tags`)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        tags, _, weight = item.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"hardware {item!r}: weight {weight!r} is not a number") from None
        out.append((tags, value))
    if not out:
        raise ConfigError("hardware mix is empty")
    return tuple(out)


def hardware_tags(entry: str) -> tuple[str, ...]:
    """The tags a real agent would report: ``aarch64-dotprod`` and ``aarch64-no-dotprod``
    imply ``aarch64`` (docs/protocol.md, release variants); sorted like the agent sends them."""
    tags = {t for t in entry.split("+") if t}
    if any(t.startswith("aarch64-") for t in tags):
        tags.add("aarch64")
    return tuple(sorted(tags))
