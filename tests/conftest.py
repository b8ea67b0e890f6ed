"""Shared fixtures: a tiny model and pack built per session, the real default pack."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.app import Agent
from agent.config import AgentConfig, config_from_mapping
from agent.inference import Engine, LoadedPack, load_pack
from agent.localbroker import LocalBroker
from agent.transport.client import RequestClient
from model_packs.build.builder import BuildOptions, build_pack
from model_packs.format import default_pack_path
from tests.operators import default_operator
from tests.tiny_model import write_hf_dir


def tiny_build_options(source: Path, packs: Path, **overrides: object) -> BuildOptions:
    base: dict[str, object] = dict(
        name="tiny",
        version="0.0.1",
        packs_dir=packs,
        source=source,
        context_length=128,
        max_tokens=32,
        golden_prompts=("temperature?", "humidity?"),
        golden_tokens=8,
        heldout_tokens=256,
        eval_chunk=64,
        min_top1=0.8,
        max_ppl_ratio=1.1,
    )
    base.update(overrides)
    return BuildOptions(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_pack_path(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pack(tiny_build_options(tiny_source, tmp_path_factory.mktemp("packs")))


@pytest.fixture(scope="session")
def tiny_versions(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three releases of the tiny pack (same weights, different versions)."""
    packs = tmp_path_factory.mktemp("versions")
    return {
        v: build_pack(tiny_build_options(tiny_source, packs, version=v)) for v in ("0.0.1", "0.0.2", "0.0.3")
    }


@pytest.fixture(scope="session")
def tiny_pack(tiny_pack_path: Path) -> LoadedPack:
    return load_pack(tiny_pack_path, check_ram=False)


@pytest.fixture()
def tiny_engine(tiny_pack: LoadedPack) -> Iterator[Engine]:
    yield Engine(tiny_pack, threads=1)


@pytest.fixture(scope="session")
def real_pack_path() -> Path:
    path = default_pack_path()
    if not (path / "manifest.json").exists():
        pytest.fail(f"the default pack is not built at {path}: run `make pack` (make test does)")
    return path


@pytest.fixture(scope="session")
def real_engine(real_pack_path: Path) -> Engine:
    return Engine(load_pack(real_pack_path), threads=2)


# ---------------------------------------------------------------- MQTT agent fixtures


STATE_ROOT = tempfile.mkdtemp(prefix="edge-agent-tests-")


@pytest.fixture(scope="session", autouse=True)
def _remove_agent_state_dirs() -> Iterator[None]:
    """Agents' state directories (seeded packs) live under one root, removed at the end."""
    yield
    shutil.rmtree(STATE_ROOT, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The default operator's key folder (tests/operators.py) is made once per session, outside
    pytest's tmp_path: removed here so no ``edge-operator-*`` folder is left behind."""
    if default_operator.cache_info().currsize:
        shutil.rmtree(default_operator().pub.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """One private mosquitto per test session, on a free port with its own config."""
    with LocalBroker() as b:
        yield b


def agent_config(broker_url: str, pack: Path | str, **overrides: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "device_id": f"dev-{uuid.uuid4().hex[:8]}",
        "mqtt": {"url": broker_url, "reconnect": {"min_s": 0.2, "max_s": 1.0}},
        "pack": {"path": str(pack), "threads": 1},
        "sensors": [
            {"name": "temperature", "unit": "°C", "aliases": ["temp", "warm"], "max_age_s": 60},
            {"name": "humidity", "unit": "%", "aliases": ["humid"], "max_age_s": 60},
            {"name": "soil_moisture", "unit": "%", "aliases": ["soil", "water"], "max_age_s": 60},
        ],
        "security": {"operator_keys": [str(default_operator().pub)]},
        "prompt": {"max_tokens": 16, "system": "Be brief."},
        "limits": {"rate": {"per_s": 1000.0, "burst": 1000}, "queue_size": 64, "per_client_queue": 32},
        "state_dir": tempfile.mkdtemp(prefix="agent-state-", dir=STATE_ROOT),
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_mapping(data, env={})


class RunningAgent:
    """An in-process agent (real broker, real engine) plus helpers to talk to it."""

    def __init__(self, cfg: AgentConfig, broker: LocalBroker, config_path: Path | None = None) -> None:
        self.cfg, self.broker = cfg, broker
        self.agent = Agent(cfg, config_path=config_path)
        self.agent.start()
        assert self.agent.transport.wait_connected(10), "agent did not connect"
        assert self.agent.transport.subscribed.wait(10), "its SUBSCRIBEs were not acknowledged"

    def client(self, **kwargs: Any) -> RequestClient:
        return RequestClient(self.broker.url, self.cfg.device_id, **kwargs)

    def publish(self, topic_leaf: str, payload: str | bytes) -> None:
        with self.client() as c:
            c.publish(self.cfg.topic(topic_leaf), payload)

    def stop(self) -> None:
        self.agent.stop()


@pytest.fixture()
def running_agent(broker: LocalBroker, tiny_pack_path: Path, start_agent: Any) -> RunningAgent:
    agent: RunningAgent = start_agent(agent_config(broker.url, tiny_pack_path), broker)
    return agent


@pytest.fixture()
def start_agent() -> Iterator[Any]:
    """Start agents for one test; all of them are stopped when it ends, pass or fail."""
    started: list[RunningAgent] = []

    def start(cfg: AgentConfig, broker: LocalBroker, config_path: Path | None = None) -> RunningAgent:
        ra = RunningAgent(cfg, broker, config_path)
        started.append(ra)
        return ra

    yield start
    for ra in started:
        ra.stop()


class StatusWatcher:
    """Subscribes to a device's retained status topic and keeps every document seen."""

    def __init__(self, broker: LocalBroker, topic: str) -> None:
        self.docs: list[dict[str, Any]] = []
        self._seen = threading.Condition()
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._c.on_message = lambda c, u, m: self._add(json.loads(m.payload))
        self._c.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
        self._c.connect("127.0.0.1", broker.port)
        self._c.loop_start()

    def _add(self, doc: dict[str, Any]) -> None:
        with self._seen:
            self.docs.append(doc)
            self._seen.notify_all()

    def wait_state(self, state: str, timeout_s: float = 15) -> dict[str, Any]:
        def reached() -> bool:
            return bool(self.docs) and self.docs[-1]["state"] == state

        with self._seen:
            if not self._seen.wait_for(reached, timeout_s):
                raise AssertionError(f"status never became {state}: {self.docs[-3:]}")
            return self.docs[-1]

    def close(self) -> None:
        self._c.loop_stop()
        self._c.disconnect()
