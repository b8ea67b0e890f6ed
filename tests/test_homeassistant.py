"""Home Assistant MQTT discovery against a real broker and a real agent with the default pack.

Every discovery document the agent publishes is held against the keys and value types Home
Assistant documents for its entity kind (SCHEMAS below, written from home-assistant.io:
integrations/sensor.mqtt, integrations/text.mqtt and the MQTT discovery page: device, origin,
availability), and every template in it is rendered the way Home Assistant renders it (Jinja,
``value_json`` = the payload's JSON) against what the agent really publishes. One agent serves
the module; the last test stops it and starts the same device without the section.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig, config_from_mapping
from agent.errors import ConfigError
from agent.homeassistant import Bridge, Ports, discovery_documents, question_request
from agent.homeassistant_config import HomeAssistantSettings, default_node_id
from agent.localbroker import LocalBroker
from agent.messages import ReplyTo
from agent.scheduling import RateLimiter, Scheduler
from agent.status import status_document
from agent.transport import Inbound
from fleet import devices
from tests.conftest import RunningAgent, agent_config

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- Home Assistant's schema
#
# Per entity kind: the keys Home Assistant documents (any other key in a discovery payload is
# ignored by it, so one here is a mistake of ours), the required ones, and each value's type.
# ``None`` in a type tuple: the docs allow null for that key.

STR, INT, BOOL, LIST, MAP = (str,), (int,), (bool,), (list,), (dict,)

COMMON: dict[str, tuple[type | None, ...]] = {
    "availability": LIST,
    "availability_mode": STR,
    "availability_template": STR,
    "availability_topic": STR,
    "device": MAP,
    "enabled_by_default": BOOL,
    "encoding": STR,
    "entity_category": STR,
    "entity_picture": STR,
    "json_attributes_template": STR,
    "json_attributes_topic": STR,
    "name": (str, None),
    "object_id": STR,
    "origin": MAP,  # the discovery page: recommended for every discovery payload
    "payload_available": STR,
    "payload_not_available": STR,
    "qos": INT,
    "unique_id": STR,
    "value_template": STR,
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "sensor": {
        "required": {"state_topic"},
        "keys": {
            **COMMON,
            "device_class": (str, None),
            "expire_after": INT,
            "force_update": BOOL,
            "icon": STR,
            "last_reset_value_template": STR,
            "options": LIST,
            "state_class": STR,
            "state_topic": STR,
            "suggested_display_precision": INT,
            "unit_of_measurement": (str, None),
        },
    },
    "text": {
        "required": {"command_topic"},
        "keys": {
            **COMMON,
            "command_template": STR,
            "command_topic": STR,
            "max": INT,
            "min": INT,
            "mode": STR,
            "pattern": STR,
            "retain": BOOL,
            "state_topic": STR,
        },
    },
}
DEVICE_KEYS: dict[str, tuple[type, ...]] = {
    "configuration_url": STR,
    "connections": LIST,
    "hw_version": STR,
    "identifiers": (str, list),
    "manufacturer": STR,
    "model": STR,
    "model_id": STR,
    "name": STR,
    "serial_number": STR,
    "suggested_area": STR,
    "sw_version": STR,
    "via_device": STR,
}
ORIGIN_KEYS: dict[str, tuple[type, ...]] = {"name": STR, "sw_version": STR, "support_url": STR}
STATE_CLASSES = ("measurement", "measurement_angle", "total", "total_increasing")
LEVEL = r"[A-Za-z0-9_-]+"  # <node_id> and <object_id>


def _typed(value: Any, types: tuple[type | None, ...]) -> bool:
    if value is None:
        return None in types
    if isinstance(value, bool):  # a bool is an int to Python, never to Home Assistant's schema
        return bool in types
    return any(t is not None and isinstance(value, t) for t in types)


def problems(component: str, doc: dict[str, Any]) -> list[str]:
    """What Home Assistant would refuse or ignore in one discovery document."""
    schema = SCHEMAS[component]
    out = [f"{k}: required" for k in sorted(schema["required"] - set(doc))]
    for key, value in doc.items():
        if key not in schema["keys"]:
            out.append(f"{key}: not a {component} option")
        elif not _typed(value, schema["keys"][key]):
            out.append(f"{key}: {value!r} is not {schema['keys'][key]}")
    if "availability" in doc and "availability_topic" in doc:
        out.append("availability and availability_topic must not be used together")
    if doc.get("qos", 0) not in (0, 1, 2):
        out.append("qos: 0, 1 or 2")
    device = doc.get("device", {})
    for key, value in device.items():
        if key not in DEVICE_KEYS or not _typed(value, DEVICE_KEYS[key]):
            out.append(f"device.{key}: {value!r} unknown or of the wrong type")
    if device and not ({"identifiers", "connections"} & set(device)):
        out.append("device: needs identifiers or connections")
    if device and "unique_id" not in doc:
        out.append("device: only works with a unique_id")
    origin = doc.get("origin", {})
    if origin and "name" not in origin:
        out.append("origin.name: required")
    out += [
        f"origin.{k}: unknown or of the wrong type"
        for k, v in origin.items()
        if not _typed(v, ORIGIN_KEYS.get(k, ()))
    ]
    if component == "sensor":
        if doc.get("entity_category") not in (None, "diagnostic"):
            out.append("entity_category: must be diagnostic for a sensor")
        if "state_class" in doc and doc["state_class"] not in STATE_CLASSES:
            out.append(f"state_class: {doc['state_class']!r}")
        if "options" in doc and (
            doc.get("device_class") != "enum"
            or not doc["options"]
            or {"state_class", "unit_of_measurement"} & set(doc)
        ):
            out.append("options: needs device_class enum, not empty, no state_class or unit")
    if component == "text":
        if not 0 <= doc.get("min", 0) <= doc.get("max", 255) <= 255:
            out.append("min/max: 0 <= min <= max <= 255")
        if doc.get("mode", "text") not in ("text", "password"):
            out.append("mode: text or password")
    return out


_JINJA = ImmutableSandboxedEnvironment()


def render(template: str, payload: bytes) -> str:
    """A template as Home Assistant renders it for an MQTT payload: ``value`` (the text) and
    ``value_json`` (its JSON)."""
    text = payload.decode()
    return _JINJA.from_string(template).render(value=text, value_json=json.loads(text)).strip()


# ---------------------------------------------------------------- a recorder and the agent


class Recorder:
    """Every message under the given filters, in order, with its retain flag."""

    def __init__(self, broker: LocalBroker, filters: list[str], login: tuple[str, str] | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._seen = threading.Condition()
        self._subscribed = threading.Event()
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if login is not None:
            self._c.username_pw_set(*login)
        self._c.on_message = self._add
        self._c.on_connect = lambda c, u, f, r, p: c.subscribe([(t, 1) for t in filters])
        self._c.on_subscribe = lambda c, u, m, r, p: self._subscribed.set()
        self._c.connect("127.0.0.1", broker.port)
        self._c.loop_start()
        assert self._subscribed.wait(10)

    def _add(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._seen:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._seen.notify_all()

    def wait_for(self, what: str, found: Callable[[], Any], timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s  # polled too: a predicate may read a file
        with self._seen:
            while not (result := found()) and time.monotonic() < deadline:
                self._seen.wait(0.1)
        assert result, f"never saw {what}; last messages: {[m[:2] for m in self.messages[-5:]]}"
        return result

    def on(self, topic: str) -> list[bytes]:
        with self._seen:
            return [p for t, p, _ in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self._c.loop_stop()
        self._c.disconnect()


PREFIX = f"ha-test-{uuid.uuid4().hex[:6]}"  # this module's discovery prefix on the shared broker
MAX_QUESTION = 120
BURST = 4  # Home Assistant's questions in this module before the rate limit (refill ~0)


def _config(broker: LocalBroker, pack: Path, **overrides: Any) -> AgentConfig:
    keys: dict[str, Any] = {
        "device_id": f"ha.{uuid.uuid4().hex[:6]}",  # a '.': not allowed in a discovery topic level
        "homeassistant": {"discovery_prefix": PREFIX, "state_interval_s": 1},
        "limits": {"max_question_chars": MAX_QUESTION, "rate": {"per_s": 0.001, "burst": BURST}},
    }
    return agent_config(broker.url, pack, **{**keys, **overrides})


class Module:
    def __init__(self, broker: LocalBroker, pack: Path) -> None:
        self.broker, self.pack = broker, pack
        self.cfg = _config(broker, pack)
        self.recorder = Recorder(broker, [f"{PREFIX}/#", f"{self.cfg.topic_root}/#"])
        self.agent: RunningAgent | None = RunningAgent(self.cfg, broker)
        self.node = default_node_id(self.cfg.device_id)
        want = {f"{PREFIX}/{c}/{self.node}/{o}/config" for c, o in ENTITIES}
        self.recorder.wait_for(
            "every discovery document", lambda: want <= {t for t, _, _ in self.recorder.messages}
        )
        self.docs = {t: json.loads(self.recorder.on(t)[-1]) for t in sorted(want)}
        state = self.cfg.topic("ha/state")  # published right after them
        self.recorder.wait_for("the first state document", lambda: self.recorder.on(state))

    def doc(self, object_id: str) -> dict[str, Any]:
        return next(d for t, d in self.docs.items() if t.endswith(f"/{object_id}/config"))

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None


ENTITIES = [
    ("sensor", "status"),
    ("sensor", "pack_version"),
    ("sensor", "tokens_per_s"),
    ("sensor", "queue_depth"),
    ("sensor", "answer"),
    ("text", "question"),
]


@pytest.fixture(scope="module")
def ha(broker: LocalBroker, real_pack_path: Path) -> Iterator[Module]:
    m = Module(broker, real_pack_path)
    yield m
    m.stop()
    m.recorder.close()


def ask(ha: Module, question: bytes) -> dict[str, Any]:
    """Type a question into the text entity (a plain publish on its command topic, as Home
    Assistant does) and return the next reply on the answer sensor's state topic."""
    topic = ha.doc("answer")["state_topic"]
    before = len(ha.recorder.on(topic))
    ha.recorder.publish(ha.doc("question")["command_topic"], question)
    ha.recorder.wait_for("an answer", lambda: len(ha.recorder.on(topic)) > before)
    reply: dict[str, Any] = json.loads(ha.recorder.on(topic)[before])
    return reply


# ---------------------------------------------------------------- tests


def test_every_discovery_document_is_what_home_assistant_documents(ha: Module) -> None:
    for topic, doc in ha.docs.items():
        m = re.fullmatch(rf"{PREFIX}/(sensor|text)/({LEVEL})/({LEVEL})/config", topic)
        assert m is not None and m.group(2) == ha.node, topic
        assert problems(m.group(1), doc) == [], (topic, doc)
    late = Recorder(ha.broker, [f"{PREFIX}/#"])  # a Home Assistant that starts later gets them all
    try:
        late.wait_for("the retained documents", lambda: len(late.messages) >= len(ha.docs))
        assert {t: json.loads(p) for t, p, retained in late.messages if retained} == ha.docs
    finally:
        late.close()
    blocks = [d["device"] for d in ha.docs.values()]  # one device, described the same everywhere
    assert all(b == blocks[0] for b in blocks)
    assert blocks[0]["name"] == ha.cfg.device_id and blocks[0]["identifiers"]
    assert {"manufacturer", "model", "sw_version"} <= set(blocks[0])
    assert len({d["unique_id"] for d in ha.docs.values()}) == len(ENTITIES)
    assert ha.doc("question")["max"] == MAX_QUESTION  # the agent's own limit, not HA's 255
    assert ha.agent is not None
    assert ha.doc("question")["command_topic"] in ha.agent.agent.homeassistant.subscriptions()


def test_the_schema_check_refuses_what_home_assistant_would(ha: Module) -> None:
    good = ha.doc("queue_depth")
    assert problems("sensor", good) == []
    assert problems("sensor", {k: v for k, v in good.items() if k != "state_topic"}) == [
        "state_topic: required"
    ]
    assert problems("sensor", {**good, "command_topic": "x"}) == ["command_topic: not a sensor option"]
    assert problems("sensor", {**good, "qos": True}) == ["qos: True is not (<class 'int'>,)"]
    assert problems("sensor", {**good, "entity_category": "config"}) == [
        "entity_category: must be diagnostic for a sensor"
    ]
    assert problems("text", {**ha.doc("question"), "max": 300}) == ["min/max: 0 <= min <= max <= 255"]
    assert problems("text", {**ha.doc("question"), "icon": "mdi:x"}) == ["icon: not a text option"]
    assert problems("sensor", {**good, "device": {"name": "x"}}) == [
        "device: needs identifiers or connections"
    ]


def test_status_pack_and_availability_read_the_agents_status_document(ha: Module) -> None:
    status_topic = ha.cfg.topic("status")
    ha.recorder.wait_for("the status document", lambda: ha.recorder.on(status_topic))
    online = ha.recorder.on(status_topic)[-1]
    for object_id in ("pack_version", "tokens_per_s", "queue_depth", "answer", "question"):
        doc = ha.doc(object_id)
        assert doc["availability_topic"] == status_topic
        assert render(doc["availability_template"], online) == doc["payload_available"] == "online"
    will = status_document(ha.cfg.device_id, "offline", None)  # what the broker publishes for a lost agent
    assert (
        render(ha.doc("answer")["availability_template"], will) == ha.doc("answer")["payload_not_available"]
    )
    for state in ("updating", "paused"):  # still serving
        paused = status_document(ha.cfg.device_id, state, None)
        assert render(ha.doc("answer")["availability_template"], paused) == "online"
    status = ha.doc("status")
    assert status["state_topic"] == status_topic and "availability_topic" not in status  # shows offline
    assert render(status["value_template"], online) == "online" and "online" in status["options"]
    version = json.loads(online)["pack"]["version"]
    assert render(ha.doc("pack_version")["value_template"], online) == version
    assert render(ha.doc("pack_version")["value_template"], will) == "none"


def test_a_question_from_the_text_entity_is_answered_in_the_answer_sensor(ha: Module) -> None:
    sensors = ha.cfg.topic("sensors/temperature")
    ha.recorder.publish(sensors, b"21.5")
    ha.recorder.wait_for("the reading", lambda: ha.recorder.on(sensors))  # the agent takes it first:
    # one connection's messages reach its one dispatcher in order
    reply = ask(ha, b"What is the temperature?")
    assert reply["type"] == "final" and reply["id"].startswith("ha-"), reply
    answer = ha.doc("answer")
    payload = json.dumps(reply).encode()
    assert render(answer["value_template"], payload) == reply["text"].strip()[:255]
    attributes = json.loads(render(answer["json_attributes_template"], payload))
    assert attributes["id"] == reply["id"] and attributes["source"] == reply["source"]
    assert [(f["sensor"], f["value"]) for f in attributes["facts"]] == [("temperature", 21.5)]
    # the state sensors update: one more answer, its decode rate, the queue empty again
    state_topic = ha.doc("tokens_per_s")["state_topic"]

    def answered() -> dict[str, Any] | None:
        docs = [json.loads(p) for p in ha.recorder.on(state_topic)]
        return next((d for d in reversed(docs) if d["answers"] >= 1), None)

    state = ha.recorder.wait_for("a state document after the answer", answered)
    assert float(render(ha.doc("tokens_per_s")["value_template"], json.dumps(state).encode())) > 0
    assert render(ha.doc("queue_depth")["value_template"], json.dumps(state).encode()) == "0"
    first = json.loads(ha.recorder.on(state_topic)[0])
    assert (
        first["answers"] == 0
        and render(ha.doc("tokens_per_s")["value_template"], ha.recorder.on(state_topic)[0]) == ""
    )


@pytest.mark.parametrize(
    ("question", "code"),
    [
        (b"\xff\xfe not text", "bad_request"),
        (b"x" * (MAX_QUESTION + 1), "too_large"),
        (b"x" * 9000, "too_large"),  # over limits.max_payload_bytes: refused before decoding
    ],
)
def test_bad_questions_get_their_error_in_the_answer_sensor(ha: Module, question: bytes, code: str) -> None:
    reply = ask(ha, question)
    assert reply["type"] == "error" and reply["code"] == code, reply
    shown = render(ha.doc("answer")["value_template"], json.dumps(reply).encode())
    assert shown.startswith(f"[{code}] ") and len(shown) <= 255


def test_questions_share_one_rate_limited_client_key(ha: Module) -> None:
    """A flood from the dashboard (or from anyone who may publish on the ask topic) costs
    tokens from one bucket, like any one client's queries: blank questions take a token and
    are refused before the model."""
    codes = [ask(ha, b"   ")["code"] for _ in range(BURST + 2)]
    assert "rate_limited" in codes and codes.count("bad_request") <= BURST, codes
    assert codes[codes.index("rate_limited") :] == ["rate_limited"] * (
        len(codes) - codes.index("rate_limited")
    )


def test_home_assistant_starting_again_gets_the_documents_again(ha: Module) -> None:
    """Home Assistant's birth message (``online`` on ``{prefix}/status``) asks for discovery
    again, as its docs recommend, besides the retained copies."""
    topic = next(iter(ha.docs))
    before = len(ha.recorder.on(topic))
    ha.recorder.publish(f"{PREFIX}/status", b"offline")  # its last will: nothing to do
    ha.recorder.publish(f"{PREFIX}/status", b"online")
    ha.recorder.wait_for("the documents again", lambda: len(ha.recorder.on(topic)) > before)
    assert len(ha.recorder.on(topic)) == before + 1
    assert json.loads(ha.recorder.on(topic)[-1]) == ha.docs[topic]


def test_a_changed_section_needs_a_restart(ha: Module, tmp_path: Path) -> None:
    """Its subscriptions are made at start: a reload keeps the running section and says so."""
    assert ha.agent is not None
    agent = ha.agent.agent
    path = tmp_path / "agent.yaml"
    changed = {
        "device_id": ha.cfg.device_id,
        "state_dir": ha.cfg.state_dir,
        "mqtt": {"url": ha.broker.url},
        "pack": {"path": str(ha.pack), "threads": 1},
        "homeassistant": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(changed), encoding="utf-8")
    agent.config_path = path
    assert "homeassistant" in agent.reload()["restart_needed_for"]
    assert agent.cfg.homeassistant == ha.cfg.homeassistant
    assert ha.doc("question")["command_topic"] in agent.homeassistant.subscriptions()


def test_removing_the_section_clears_its_entries(ha: Module) -> None:
    """Last in the module: the agent stops (its status says offline, so every entity but the
    status becomes unavailable), then the same device starts without the section."""
    status_topic = ha.cfg.topic("status")
    ha.stop()
    ha.recorder.wait_for(
        "offline", lambda: json.loads(ha.recorder.on(status_topic)[-1])["state"] == "offline"
    )
    offline = ha.recorder.on(status_topic)[-1]
    assert render(ha.doc("answer")["availability_template"], offline) == "offline"
    assert render(ha.doc("status")["value_template"], offline) == "offline"
    retained = [*ha.docs, ha.doc("tokens_per_s")["state_topic"]]
    ledger = Path(ha.cfg.state_dir) / "homeassistant.json"
    assert sorted(json.loads(ledger.read_text())["retained"]) == sorted(retained)

    data = {"homeassistant": None}  # the section removed
    cfg = _config(ha.broker, ha.pack, device_id=ha.cfg.device_id, state_dir=ha.cfg.state_dir, **data)
    assert cfg.homeassistant is None
    again = RunningAgent(cfg, ha.broker)
    try:
        ha.recorder.wait_for(
            "empty retained payloads", lambda: all(ha.recorder.on(t)[-1:] == [b""] for t in retained)
        )
        ha.recorder.wait_for("the ledger emptied", lambda: json.loads(ledger.read_text())["retained"] == [])
        assert again.agent.homeassistant.subscriptions() == []
    finally:
        again.stop()
    fresh = Recorder(ha.broker, [f"{PREFIX}/#", retained[-1]])  # a Home Assistant starting now
    try:  # retained messages come first on a new subscription: all of them before this marker
        fresh.publish(f"{PREFIX}/marker", b"m")
        fresh.wait_for("the marker", lambda: fresh.on(f"{PREFIX}/marker"))
        assert [t for t, _, _ in fresh.messages] == [f"{PREFIX}/marker"]
    finally:
        fresh.close()


def _documented_acl() -> str:
    """The broker ACL lines docs/homeassistant.md gives: the test uses exactly those."""
    text = (ROOT / "docs" / "homeassistant.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```text\n(.*?)^```$", text, re.S | re.M)
    return next(b for b in blocks if "user homeassistant" in b)


def test_the_documented_broker_acl_is_enough_and_no_more(tmp_path: Path, real_pack_path: Path) -> None:
    """The shipped ACL plus the lines the docs give: a provisioned device publishes its entries
    and hears Home Assistant's birth message, Home Assistant's login reads them and the state and
    asks; a device cannot publish another node's entries."""
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    logins = {user: uuid.uuid4().hex for user in ("gh-1", "homeassistant")}
    for user, password in logins.items():
        devices.add_user(passwd, user, password)
    acl.write_text((ROOT / "deploy" / "mosquitto" / "acl").read_text() + "\n" + _documented_acl())
    with LocalBroker(listener_conf=f"password_file {passwd}\nacl_file {acl}\n") as broker:
        home = Recorder(
            broker,
            ["homeassistant/#", "edge/+/status", "edge/+/ha/state", "edge/+/ha/answer"],
            ("homeassistant", logins["homeassistant"]),
        )
        mqtt_login = {"url": broker.url, "username": "gh-1", "password": logins["gh-1"]}
        cfg = agent_config(broker.url, real_pack_path, device_id="gh-1", mqtt=mqtt_login, homeassistant={})
        agent = RunningAgent(cfg, broker)
        try:
            configs = lambda: [t for t, p, _ in home.messages if t.endswith("/config") and p]  # noqa: E731
            home.wait_for("the entries", lambda: len(configs()) == len(ENTITIES))
            assert all(t.startswith("homeassistant/") and "/gh-1/" in t for t in configs())
            home.wait_for(
                "the status and state",
                lambda: home.on(cfg.topic("status")) and home.on(cfg.topic("ha/state")),
            )
            home.publish(cfg.topic("ha/ask"), b"   ")  # Home Assistant's login may ask
            home.wait_for("the answer", lambda: home.on(cfg.topic("ha/answer")))
            assert json.loads(home.on(cfg.topic("ha/answer"))[0])["code"] == "bad_request"
            home.publish("homeassistant/status", b"online")  # the device hears the birth message
            home.wait_for("the entries again", lambda: len(configs()) == 2 * len(ENTITIES))
            device = Recorder(broker, ["edge/gh-1/#"], ("gh-1", logins["gh-1"]))
            try:  # another node's entry is dropped by the broker; the device's own goes through
                device.publish("homeassistant/sensor/gh-2/x/config", b"{}")
                device.publish("homeassistant/sensor/gh-1/marker/config", b"{}")
                home.wait_for("the marker", lambda: home.on("homeassistant/sensor/gh-1/marker/config"))
                assert home.on("homeassistant/sensor/gh-2/x/config") == []
            finally:
                device.close()
        finally:
            agent.stop()
            home.close()


# ---------------------------------------------------------------- pure parts, no broker


def test_config_section_errors_name_their_keys() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_mapping(
            {
                "device_id": "d",
                "homeassistant": {
                    "discovery_prefix": "home/#",
                    "node_id": "a b",
                    "enabled": "yes",
                    "colour": 1,
                },
            },
            env={},
        )
    text = err.value.message
    for key in ("discovery_prefix", "node_id", "enabled", "colour"):
        assert f"homeassistant.{key}:" in text, text


def test_disabled_section_publishes_nothing_and_subscribes_to_nothing(tmp_path: Path) -> None:
    cfg = config_from_mapping(
        {"device_id": "d", "state_dir": str(tmp_path), "homeassistant": {"enabled": False}}, env={}
    )
    assert cfg.homeassistant is not None and discovery_documents(cfg, cfg.homeassistant, "1") == {}
    bridge, _ = _bridge(cfg)
    assert bridge.subscriptions() == [] and not bridge.needed()


def test_node_id_and_question_payloads() -> None:
    assert default_node_id("greenhouse.north-1") == "greenhouse_north-1"
    cfg = config_from_mapping({"device_id": "d"}, env={})
    assert question_request(b"  Is it warm?\n", cfg.limits, "ha-1")["question"] == "Is it warm?"
    settings = HomeAssistantSettings(node_id="garden")
    topics = set(discovery_documents(cfg, settings, "1"))
    assert topics == {f"homeassistant/{c}/garden/{o}/config" for c, o in ENTITIES}
    no_questions = discovery_documents(cfg, HomeAssistantSettings(questions=False), "1")
    assert not any("/text/" in t for t in no_questions)


def test_a_retained_question_is_dropped_unanswered(tmp_path: Path) -> None:
    """A retained question would be asked again at every reconnect: dropped and counted,
    never queued, as the router does with a retained request."""
    cfg = config_from_mapping({"device_id": "d", "state_dir": str(tmp_path), "homeassistant": {}}, env={})
    bridge, seen = _bridge(cfg)
    ask_topic = bridge.topics.ask
    assert bridge.handle(Inbound(ask_topic, b"Is it warm?", retain=True))
    assert seen["refused"] == [(ask_topic, "a question must not be retained")] and seen["replies"] == []
    assert bridge.scheduler.depth == 0
    assert bridge.handle(Inbound(ask_topic, b"Is it warm?"))
    assert bridge.scheduler.depth == 1 and seen["counted"] == [("query", "queued")]
    assert not bridge.handle(Inbound(cfg.topic("query"), b"{}"))  # the router's


def _bridge(cfg: AgentConfig) -> tuple[Bridge, dict[str, list[Any]]]:
    seen: dict[str, list[Any]] = {"refused": [], "replies": [], "counted": []}

    def reply(target: ReplyTo, body: dict[str, Any]) -> None:
        seen["replies"].append((target.topic, body))

    ports = Ports(
        lambda topic, body, retain, wait_s: None,
        reply,
        lambda: True,
        lambda: 0,
        lambda topic, why: seen["refused"].append((topic, why)),
        lambda kind, outcome: seen["counted"].append((kind, outcome)),
    )
    limiter = RateLimiter(cfg.limits.rate.per_s, cfg.limits.rate.burst, cfg.limits.max_client_keys)
    return Bridge(cfg, "1", lambda: cfg.limits, limiter, Scheduler(cfg.limits), ports), seen
