"""Agent configuration: YAML -> frozen, validated value objects, built in one place.

This is the only module that reads the environment. Every problem is reported with the
key path (``mqtt.url``, ``sensors[2].source.interval_s``) and the reason, at start-up,
before anything connects or loads.

Environment overrides: ``EDGE_AGENT_DEVICE_ID``, ``EDGE_AGENT_MQTT_URL``,
``EDGE_AGENT_MQTT_USERNAME``, ``EDGE_AGENT_MQTT_PASSWORD``, ``EDGE_AGENT_PACK``,
``EDGE_AGENT_LOG_LEVEL``, ``EDGE_AGENT_STATE_DIR``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from agent.errors import ConfigError
from agent.homeassistant_config import HomeAssistantSettings, check_homeassistant
from agent.meaning import Meaning, MeaningError, parse_meaning

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """'90s', '5m', '1h', '250ms' or a number of seconds -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    m = _DURATION.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 1h")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class ReconnectConfig:
    min_s: float = 0.5
    max_s: float = 30.0


@dataclass(frozen=True)
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    protocol: str = "5"  # "5" or "3.1.1"
    topic_root: str = "edge/{device_id}"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "mqtts" or self.ca_file is not None


@dataclass(frozen=True)
class PackConfig:
    path: str | None = None  # None: the default pack in the cache
    threads: int = 2
    context_length: int | None = None


@dataclass(frozen=True)
class RateLimit:
    per_s: float = 2.0
    burst: int = 10


@dataclass(frozen=True)
class Limits:
    queue_size: int = 32
    per_client_queue: int = 8
    max_payload_bytes: int = 8192
    max_question_chars: int = 2000
    max_tokens: int = 256
    deadline_s: float = 120.0
    rate: RateLimit = field(default_factory=RateLimit)
    max_sensor_payload_bytes: int = 512  # a reading is a number or a tiny JSON object
    inbox_size: int = 1000  # messages waiting for the dispatcher; a flood beyond is dropped, counted
    max_client_keys: int = 16  # distinct client keys with own buckets/queues; more share one

    @property
    def max_packet_bytes(self) -> int:
        """MQTT 5 Maximum Packet Size asked of the broker: room for the largest request that
        still gets a `too_large` reply (4x the payload cap) plus topic and properties."""
        return 4 * max(self.max_payload_bytes, self.max_sensor_payload_bytes) + 4096


@dataclass(frozen=True)
class SourceConfig:
    type: str = "mqtt"  # mqtt | file | command
    topic: str | None = None  # mqtt: default {topic_root}/sensors/{name}
    path: str | None = None  # file
    argv: tuple[str, ...] = ()  # command
    # where the number is (agent/sensors/extract.py): a regex's first group in a file's or
    # command's text (a w1_slave's "t=21437" after "YES"); a dotted path into JSON (BME280.Temperature)
    pattern: str | None = None
    json_path: str | None = None
    scale: float = 1.0
    interval_s: float = 10.0
    timeout_s: float = 5.0


@dataclass(frozen=True)
class SensorConfig:
    name: str
    unit: str = ""
    aliases: tuple[str, ...] = ()
    max_age_s: float = 120.0
    window_s: float = 3600.0
    max_points: int = 4096
    source: SourceConfig = field(default_factory=SourceConfig)
    # what a value means (bands, target, limits): verdicts come from it, not from the model
    meaning: Meaning | None = None


@dataclass(frozen=True)
class PromptConfig:
    # The verdicts in the prompt come from the sensors' meaning (agent/answers), and the
    # answer is checked against them; the last sentence asks the model to keep to them. A
    # system prompt of one's own should say the same (a 128-token test pack has no room for
    # both, so it is not appended to a configured one).
    system: str = (
        "You answer questions about a greenhouse from its sensor readings. "
        "Give the reading with its unit in one short sentence. "
        "The verdicts given with the readings are true: repeat them and never contradict them; "
        "when an answer is given, start with it (Yes or No)."
    )
    temperature: float = 0.0
    repetition_penalty: float = 1.05  # greedy 135M models loop without a light penalty
    max_tokens: int = 96


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True
    interval_s: float = 60.0  # one metrics record per interval
    max_records: int = 100_000  # spool bound (records waiting for the broker)
    max_age_s: float = 7 * 86400.0  # older undelivered records are dropped (and reported)
    drain_rate: float = 20.0  # batches per second at most while a backlog drains
    # "fleet": a record is deleted when the fleet's ack ({root}/telemetry/ack) covers it;
    # "broker": at the broker's PUBACK (no fleet service; a broker restart can lose records)
    ack: str = "fleet"
    ack_timeout_s: float = 120.0  # records sent and no ack advanced for this long: send again


@dataclass(frozen=True)
class UpdatesConfig:
    repository_url: str | None = None  # the fleet's TUF repository (only ever from here)
    trusted_root: str | None = None  # root.json installed at provisioning
    hardware: str = "any"
    variants: bool = True  # take a release's variant for this CPU (model_packs/hardware.py)
    latency_factor: float = 3.0
    ram_budget_mb: int | None = None  # RAM for model packs; None: what the system has free


@dataclass(frozen=True)
class RepliesConfig:
    # MQTT filters a requester's reply topic must match. Never a device's tree, a `$` topic or
    # a wildcard, whatever is listed: the agent must not publish where the requester may not.
    allowed_topics: tuple[str, ...] = ("edge-ops/#",)


@dataclass(frozen=True)
class SecurityConfig:
    # Ed25519 public keys (PEM) of the operators and the fleet whose signed instructions this
    # device acts on (updates, reload over MQTT). Empty: no privileged action over MQTT.
    operator_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class EscalationSettings:
    """The ``escalation:`` section as loaded: an OpenAI-compatible chat endpoint that larger
    questions may go to, and the routing policy. The keys mirror
    ``agent.answers.escalation.EscalationConfig`` (which validates them: this layer may not
    import it) plus the routing policy's; the agent checks the section when it starts and on
    every reload (``agent.answers.hybrid``), so a bad value is ``bad_config`` before anything
    is served. Absent (null): no escalation."""

    url: str
    model: str
    privacy: str  # none | facts | facts_and_question: what may leave the device
    api_key: str | None = field(default=None, repr=False)
    api_key_file: str | None = None
    timeout_s: float = 8.0
    max_tokens: int = 256
    temperature: float = 0.0
    ca_file: str | None = None
    confidence_threshold: float = -1.2  # mean token log-probability under which: low confidence
    min_remote_s: float = 1.0  # less time left than this before the deadline: no escalation
    min_local_s: float = 0.5  # after a failed escalation, less than this left: the template


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    limits: Limits = field(default_factory=Limits)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sensors: tuple[SensorConfig, ...] = ()
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    replies: RepliesConfig = field(default_factory=RepliesConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    escalation: EscalationSettings | None = None  # None: every answer is local
    homeassistant: HomeAssistantSettings | None = None  # None: no Home Assistant discovery
    tags: tuple[str, ...] = ()  # free labels for the fleet's registry (status document)
    state_dir: str = "/var/lib/edge-agent"
    log_level: str = "info"
    watchdog: bool = True

    @property
    def topic_root(self) -> str:
        return self.mqtt.topic_root.replace("{device_id}", self.device_id)

    def topic(self, leaf: str) -> str:
        return f"{self.topic_root}/{leaf}"


# ---------------------------------------------------------------- generic loader
#
# Every problem is collected, not only the first: an operator fixing a config should see them
# all in one run. A value with a problem is recorded in ``problems`` and its default stands in
# for it, so the rest can still be built and checked; a problem where no default can stand in
# (a required key) stops that object with ``_Unbuildable``, and its parent carries on.


class _Unbuildable(Exception):
    """A value whose problems are already recorded and that no default can replace."""


def _convert(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(value, args[0], path, problems)
    if hint is Meaning:  # its own forms (a band chain, a band list, a mapping): agent/meaning.py
        try:
            return parse_meaning(value, path)
        except MeaningError as exc:
            raise ConfigError(str(exc)) from None
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, path, problems)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        inner = typing.get_args(hint)[0]
        items = [
            _attempt(problems, _convert, v, inner, f"{path}[{i}]", problems) for i, v in enumerate(value)
        ]
        if any(item is _FAILED for item in items):
            raise _Unbuildable
        return tuple(items)
    return _scalar(value, hint, path)


_FAILED = object()


def _attempt(problems: list[str], make: Callable[..., Any], *args: Any) -> Any:
    """``make(*args)``, or ``_FAILED`` with its problem recorded."""
    try:
        return make(*args)
    except ConfigError as exc:
        problems.append(exc.message)
    except _Unbuildable:
        pass
    return _FAILED


def _scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is float:
        if path.endswith("_s") and isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {hint}")


def _build(cls: type[Any], data: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if "privileged_clients" in unknown and not path:
        unknown.remove("privileged_clients")
        problems.append(
            "privileged_clients was removed: any client can claim a client key, so updates and "
            "reload over MQTT must now be signed; list the operators' public keys in "
            "security.operator_keys (edge-fleet keys operator) and remove privileged_clients"
        )
    where = f"{path}." if path else ""
    problems.extend(f"{where}{key}: unknown key (known: {', '.join(sorted(fields))})" for key in unknown)
    kwargs = {}
    complete = True
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name in data:
            value = _attempt(problems, _convert, data[name], hints[name], key, problems)
            if value is not _FAILED:
                kwargs[name] = value
            elif required:
                complete = False
        elif required:
            problems.append(f"{key}: required key is missing")
            complete = False
    if not complete:
        raise _Unbuildable
    return cls(**kwargs)


# ---------------------------------------------------------------- checks


def _check(cfg: AgentConfig, sensors: list[tuple[int, SensorConfig]]) -> Iterator[str]:
    """Every problem the values have together (each names its key). ``sensors``: the sensors
    to check with their index in the file (``cfg.sensors``, or those that could be built)."""
    for i, tag in enumerate(cfg.tags):
        if not re.fullmatch(r"[A-Za-z0-9._:=-]{1,64}", tag):
            yield f"tags[{i}]: {tag[:80]!r} must be 1-64 letters, digits or . _ : = -"
    t = cfg.telemetry
    if (
        t.interval_s <= 0
        or t.max_age_s <= 0
        or t.drain_rate <= 0
        or t.ack_timeout_s <= 0
        or t.max_records < 3
    ):
        yield (
            "telemetry: interval_s, max_age_s, drain_rate and ack_timeout_s must be positive, "
            "max_records >= 3"
        )
    if t.ack not in ("fleet", "broker"):
        yield f"telemetry.ack: {t.ack[:40]!r} must be fleet or broker"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cfg.device_id):
        yield "device_id: 1-64 characters of letters, digits, '.', '_' or '-'"
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        yield f"log_level: {cfg.log_level!r} must be debug, info, warning or error"
    yield from _check_prompt(cfg.prompt)
    if urlparse(cfg.mqtt.url).scheme not in ("mqtt", "mqtts"):
        yield f"mqtt.url: {cfg.mqtt.url!r} must start with mqtt:// or mqtts://"
    if cfg.mqtt.protocol not in ("5", "3.1.1"):
        yield f"mqtt.protocol: {cfg.mqtt.protocol!r} must be '5' or '3.1.1'"
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(cfg.mqtt, key)
        if value is not None and not Path(value).is_file():
            yield f"mqtt.{key}: file {value} does not exist"
    if cfg.pack.path is not None and not Path(cfg.pack.path).is_dir():
        yield f"pack.path: {cfg.pack.path} is not a directory"
    if cfg.updates.trusted_root is not None and not Path(cfg.updates.trusted_root).is_file():
        yield f"updates.trusted_root: file {cfg.updates.trusted_root} does not exist"
    for key_file in cfg.security.operator_keys:
        if not Path(key_file).is_file():
            yield f"security.operator_keys: {key_file} does not exist"
    for i, pattern in enumerate(cfg.replies.allowed_topics):
        if not _valid_filter(pattern) or pattern.startswith("$"):
            yield f"replies.allowed_topics[{i}]: {pattern!r} is not an MQTT topic filter"
    for name in (
        "queue_size",
        "per_client_queue",
        "max_payload_bytes",
        "max_tokens",
        "max_sensor_payload_bytes",
        "inbox_size",
        "max_client_keys",
    ):
        if getattr(cfg.limits, name) < 1:
            yield f"limits.{name}: must be >= 1"
    yield from _check_sensors(sensors)
    if cfg.homeassistant is not None:
        yield from check_homeassistant(cfg.homeassistant)


def _valid_filter(pattern: str) -> bool:
    """An MQTT topic filter: '+' fills a whole level, '#' only as the whole last level."""
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            return False
    return bool(pattern) and "\x00" not in pattern


def _check_prompt(p: PromptConfig) -> Iterator[str]:
    """The ranges queries are held to: a default out of range would fail every query."""
    if not 0.0 <= p.temperature <= 5.0:
        yield f"prompt.temperature: {p.temperature} must be within 0..5"
    if not 0.0 < p.repetition_penalty <= 10.0:
        yield f"prompt.repetition_penalty: {p.repetition_penalty} must be within (0, 10]"
    if p.max_tokens < 1:
        yield "prompt.max_tokens: must be >= 1"


def _check_extraction(src: SourceConfig, p: str) -> Iterator[str]:
    """A pattern that cannot compile or a path with an empty step would reject every reading."""
    if src.pattern is not None:
        try:
            groups = re.compile(src.pattern).groups
        except re.error as exc:
            yield f"{p}.source.pattern: {src.pattern[:60]!r} is not a regular expression: {exc}"
        else:
            if groups > 1 or src.type == "mqtt":
                yield f"{p}.source.pattern: at most one group, for a file or command source"
    if src.json_path is not None and "" in src.json_path.split("."):
        yield f"{p}.source.json_path: {src.json_path[:60]!r} has an empty step (keys joined by '.')"


def _check_sensors(sensors: list[tuple[int, SensorConfig]]) -> Iterator[str]:
    seen: set[str] = set()
    for i, s in sensors:
        p = f"sensors[{i}]"
        if not re.fullmatch(r"[a-z0-9_]{1,48}", s.name):
            yield f"{p}.name: {s.name!r} must be lowercase letters, digits or '_'"
        if s.name in seen:
            yield f"{p}.name: sensor {s.name!r} is defined twice"
        seen.add(s.name)
        src = s.source
        if src.type not in ("mqtt", "file", "command"):
            yield f"{p}.source.type: {src.type!r} must be mqtt, file or command"
        if src.type == "file" and not src.path:
            yield f"{p}.source.path: required for a file source"
        if src.type == "command" and not src.argv:
            yield f"{p}.source.argv: required for a command source"
        yield from _check_extraction(src, p)
        if src.interval_s <= 0 or s.max_age_s <= 0 or s.window_s <= 0 or s.max_points < 2:
            yield f"{p}: intervals, ages and windows must be positive, max_points >= 2"


_ENV = {
    "EDGE_AGENT_DEVICE_ID": ("device_id",),
    "EDGE_AGENT_MQTT_URL": ("mqtt", "url"),
    "EDGE_AGENT_MQTT_USERNAME": ("mqtt", "username"),
    "EDGE_AGENT_MQTT_PASSWORD": ("mqtt", "password"),
    "EDGE_AGENT_PACK": ("pack", "path"),
    "EDGE_AGENT_LOG_LEVEL": ("log_level",),
    "EDGE_AGENT_STATE_DIR": ("state_dir",),
}


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for var, keys in _ENV.items():
        if var in env:
            node = data
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = env[var]


def config_from_mapping(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> AgentConfig:
    raw = dict(data)
    _apply_env(raw, os.environ if env is None else env)
    problems: list[str] = []
    try:
        cfg: AgentConfig = _build(AgentConfig, raw, "", problems)
    except _Unbuildable:
        raise config_error(problems) from None
    if cfg.mqtt.password is not None and cfg.mqtt.username is None:
        # a password alone logs in as the device id: the identity the broker ACL expects
        cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, username=cfg.device_id))
    built = list(enumerate(cfg.sensors)) if cfg.sensors else _sensors_built(raw.get("sensors"))
    problems.extend(_check(cfg, built))
    if problems:
        raise config_error(problems)
    return cfg


def _sensors_built(raw: object) -> list[tuple[int, SensorConfig]]:
    """The sensors that can be built when the list as a whole could not (one lacks its name):
    their own checks still run. Their build problems are already recorded, so dropped here."""
    if not isinstance(raw, list):
        return []
    built = []
    for i, item in enumerate(raw):
        if isinstance(item, Mapping):
            with contextlib.suppress(_Unbuildable):
                built.append((i, _build(SensorConfig, item, f"sensors[{i}]", [])))
    return built


def config_error(problems: list[str]) -> ConfigError:
    """One error for all the problems found: a single one reads as before (``key: reason``),
    several as a count and one line each (types and keys first, then the checks of values)."""
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError(
        f"{len(problems)} problems in the configuration:\n" + "\n".join(f"  {p}" for p in problems)
    )


@dataclass(frozen=True)
class SystemdEnv:
    """What systemd tells the service through its environment (notify socket, watchdog)."""

    notify_socket: str | None
    watchdog_usec: int | None


def systemd_env(env: Mapping[str, str] | None = None) -> SystemdEnv:
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    return SystemdEnv(env.get("NOTIFY_SOCKET") or None, int(usec) if usec.isdigit() else None)


# Read once at start (connections, threads, queues, buckets, budgets): a reload reports them.
_RESTART_KEYS: dict[str, Callable[[AgentConfig], object]] = {
    "mqtt": lambda c: c.mqtt,
    "sensors": lambda c: c.sensors,
    "device_id": lambda c: c.device_id,
    "state_dir": lambda c: c.state_dir,
    "log_level": lambda c: c.log_level,
    "limits.queue_size": lambda c: c.limits.queue_size,
    "limits.per_client_queue": lambda c: c.limits.per_client_queue,
    "limits.rate": lambda c: c.limits.rate,
    "limits.max_sensor_payload_bytes": lambda c: c.limits.max_sensor_payload_bytes,
    "limits.inbox_size": lambda c: c.limits.inbox_size,
    "limits.max_client_keys": lambda c: c.limits.max_client_keys,
    "updates.latency_factor": lambda c: c.updates.latency_factor,
    "updates.ram_budget_mb": lambda c: c.updates.ram_budget_mb,
}


def restart_needed(running: AgentConfig, new: AgentConfig) -> list[str]:
    """The keys that differ in ``new`` but apply only when the agent starts again."""
    return [key for key, read in _RESTART_KEYS.items() if read(new) != read(running)]


def load_config(path: Path, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate a YAML config; raises ConfigError naming the key and reason."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return config_from_mapping(data, env)
