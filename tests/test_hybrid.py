"""Hybrid routing in the running agent (issue 12): a real mosquitto, the real tiny engine, and a
real OpenAI chat-completions server around the tiny pack (tests/openai_server.py) as the
upstream. Escalated answers are checked like the model's; an upstream that is cut off, hangs
or answers wrong never costs the answer or the deadline; privacy holds on the wire; the config
is refused at start and at reload; the counters count."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.answers import escalation as esc
from agent.answers.hybrid import hybrid_from
from agent.app import Agent
from agent.config import config_from_mapping, load_config
from agent.errors import ConfigError
from agent.inference import LoadedPack
from agent.localbroker import LocalBroker
from tests.conftest import RunningAgent, agent_config
from tests.openai_server import OpenAIServer

QUESTION = "How warm is it?"  # picks temperature; its template: "Temperature is 21.5 °C."
GOOD_TEXT = "Temperature is 21.5 °C."
ALL_PASS = ("passed", "skipped")


@pytest.fixture()
def server(tiny_pack: LoadedPack) -> Iterator[OpenAIServer]:
    with OpenAIServer(tiny_pack) as s:
        yield s


def answers_with(server: OpenAIServer, text: str) -> None:
    """The server's real request handling, with this text as the completion's content."""
    real = server.answer
    server.answer = lambda request, content=None: real(request, content=text)  # type: ignore[method-assign]


def start(
    broker: LocalBroker,
    pack: Path,
    start_agent: Any,
    server: OpenAIServer | None,
    privacy: str = "facts_and_question",
    **overrides: Any,
) -> RunningAgent:
    escalation = overrides.pop("escalation", {})
    if server is not None:
        escalation = {"url": server.url, "model": "tiny", "privacy": privacy, "max_tokens": 8, **escalation}
    cfg = agent_config(broker.url, pack, escalation=escalation or None, **overrides)
    ra: RunningAgent = start_agent(cfg, broker)
    ra.publish("sensors/temperature", "21.5")
    time.sleep(0.3)
    return ra


def ask(ra: RunningAgent, question: str = QUESTION, **fields: Any) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    with ra.client() as c:
        reply = c.request("query", {"question": question, "max_tokens": 12, **fields}, 30)
    assert reply["type"] == "final", reply
    return reply, time.monotonic() - started


def assert_passed(reply: dict[str, Any]) -> None:
    assert all(v in ALL_PASS for v in reply["checks"].values()), reply["checks"]


# ---------------------------------------------------------------- answered upstream


def test_route_remote_is_answered_by_the_upstream_and_checked(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    answers_with(server, GOOD_TEXT)
    ra = start(broker, tiny_pack_path, start_agent, server)
    with ra.client() as c:
        chunks: list[dict[str, Any]] = []
        reply = c.request("query", {"question": QUESTION, "route": "remote"}, 30, chunks.append)
    assert reply["source"] == "escalated" and reply["text"] == GOOD_TEXT, reply
    assert_passed(reply)
    routing = reply["routing"]
    assert (routing["decision"], routing["code"], routing["escalation_error"]) == (
        "escalate_first",
        "requested",
        None,
    )
    assert routing["upstream_ms"] > 0
    assert chunks == [] and reply["seq"] == 0  # the local model never ran: nothing streamed
    assert reply["usage"]["completion_tokens"] == 0 and reply["finish_reason"] is None
    assert reply["facts"][0]["value"] == 21.5 and reply["pack"] == {"name": "tiny", "version": "0.0.1"}
    [req] = server.requests
    user = json.loads(req.body)["messages"][1]["content"]
    assert QUESTION in user and "21.5" in user  # facts_and_question: both go


def test_route_remote_with_the_upstreams_own_text_passes_or_is_replaced(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    """The tiny upstream writes noise: used only if it passes the checks, else the local way."""
    ra = start(broker, tiny_pack_path, start_agent, server)
    reply, _ = ask(ra, route="remote")
    assert_passed(reply)
    assert len(server.requests) == 1
    if reply["source"] == "escalated":
        assert reply["routing"]["escalation_error"] is None
    else:
        assert reply["routing"]["escalation_error"] == "checks_failed"
        assert reply["source"] in ("model", "template")


def test_an_upstream_text_that_contradicts_the_facts_is_not_used(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    answers_with(server, "Temperature is 35 °C.")
    ra = start(broker, tiny_pack_path, start_agent, server)
    reply, _ = ask(ra, route="remote")
    assert reply["source"] in ("model", "template") and "35" not in reply["text"]
    assert_passed(reply)
    assert reply["routing"]["escalation_error"] == "checks_failed"
    assert reply["routing"]["decision"] == "escalate_first"


def test_a_local_answer_that_is_unsure_or_wrong_escalates_after_local(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    """confidence_threshold 0: every local text is unsure (or failed its checks): escalated."""
    answers_with(server, GOOD_TEXT)
    ra = start(broker, tiny_pack_path, start_agent, server, escalation={"confidence_threshold": 0})
    reply, _ = ask(ra)
    assert reply["source"] == "escalated" and reply["text"] == GOOD_TEXT
    routing = reply["routing"]
    assert routing["decision"] == "escalate_after_local"
    assert routing["code"] in ("low_confidence", "validation_failed")
    assert reply["usage"]["completion_tokens"] >= 1  # the local run's usage stays reported
    # route local never escalates
    reply, _ = ask(ra, route="local")
    assert reply["source"] in ("model", "template") and len(server.requests) == 1
    assert reply["routing"]["escalation_error"] is None


def test_a_question_no_sensor_matches_escalates_only_if_privacy_lets_the_question_out(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    answers_with(server, "Nitrogen, phosphorus and potassium.")
    question = "What does the abbreviation NPK stand for in fertilizer?"
    ra = start(broker, tiny_pack_path, start_agent, server)
    reply, _ = ask(ra, question)
    assert reply["source"] == "escalated" and reply["facts"] == []
    assert (reply["routing"]["decision"], reply["routing"]["code"]) == (
        "escalate_first",
        "no_sensor_knowledge",
    )
    ra.stop()
    ra = start(broker, tiny_pack_path, start_agent, server, privacy="facts")
    reply, _ = ask(ra, question)
    assert reply["source"] in ("model", "template") and len(server.requests) == 1
    assert reply["routing"]["code"] == "privacy"  # nothing the upstream could use


# ---------------------------------------------------------------- faults and the deadline


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("cut", "offline"), ("cut_early", "offline"), ("hang", "timeout"), ("error", "http_error")],
)
def test_an_upstream_that_fails_costs_neither_the_answer_nor_the_deadline(
    broker: LocalBroker,
    tiny_pack_path: Path,
    start_agent: Any,
    server: OpenAIServer,
    mode: str,
    reason: str,
) -> None:
    """The escalation may wait until min_local_s before the deadline (timeout_s is longer);
    then the local model or the template answers, before the deadline, and says why."""
    server.mode = mode
    deadline_s = 3.0
    ra = start(
        broker,
        tiny_pack_path,
        start_agent,
        server,
        escalation={"timeout_s": 30},
        limits={"deadline_s": deadline_s},
    )
    reply, elapsed = ask(ra, route="remote")
    assert elapsed < deadline_s, elapsed
    assert reply["source"] in ("model", "template")
    assert_passed(reply)
    assert reply["routing"]["escalation_error"] == reason
    assert reply["routing"]["decision"] == "escalate_first"
    if mode == "hang":  # it used the time up to min_local_s (0.5 s) before the deadline
        assert reply["routing"]["upstream_ms"] >= (deadline_s - 0.5 - 0.3) * 1000
        assert reply["source"] == "template"
    else:  # a fault is known at once: the local model had the time
        assert reply["routing"]["upstream_ms"] < 2000


def test_an_upstream_that_hangs_after_the_local_answer_keeps_the_local_answer(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    server.mode = "hang"
    deadline_s = 2.5
    ra = start(
        broker,
        tiny_pack_path,
        start_agent,
        server,
        escalation={"timeout_s": 30, "confidence_threshold": 0},
        limits={"deadline_s": deadline_s},
    )
    reply, elapsed = ask(ra)
    assert elapsed < deadline_s + 0.1, elapsed  # the reply is sent 50 ms before the agent's deadline
    assert reply["source"] in ("model", "template")
    assert_passed(reply)
    assert reply["routing"]["decision"] == "escalate_after_local"
    assert reply["routing"]["escalation_error"] == "timeout"


def test_a_short_timeout_s_leaves_the_rest_to_the_local_model(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    server.mode = "hang"
    ra = start(broker, tiny_pack_path, start_agent, server, escalation={"timeout_s": "300ms"})
    reply, elapsed = ask(ra, route="remote")
    assert reply["routing"]["escalation_error"] == "timeout"
    assert 250 <= reply["routing"]["upstream_ms"] < 1000
    assert reply["source"] in ("model", "template") and reply["usage"]["completion_tokens"] >= 1
    assert elapsed < 10


# ---------------------------------------------------------------- privacy


def test_privacy_facts_sends_the_facts_and_never_the_question(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    answers_with(server, GOOD_TEXT)
    question = "How warm is it in bed two before the frost tonight?"
    ra = start(broker, tiny_pack_path, start_agent, server, privacy="facts")
    reply, _ = ask(ra, question, route="remote")
    assert reply["source"] == "escalated"
    [req] = server.requests
    body = req.body.decode("utf-8")
    for form in (question, "frost", "bed two", "tonight"):
        assert form not in body
    user = json.loads(body)["messages"][1]["content"]
    assert "21.5" in user and esc.QUESTION_WITHHELD in user


def test_privacy_none_never_calls_the_server(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    ra = start(broker, tiny_pack_path, start_agent, server, privacy="none")
    reply, _ = ask(ra, route="remote")
    reply2, _ = ask(ra, "What does the abbreviation NPK stand for in fertilizer?")
    assert server.requests == []
    assert reply["source"] in ("model", "template") and reply["routing"]["escalation_error"] is None
    assert reply["routing"]["upstream_ms"] is None
    # local passed: the first step's block is kept; local failed: the template, blocked the same
    assert reply["routing"]["code"] == "disabled", reply["routing"]
    assert reply["routing"]["decision"] == ("local" if reply["source"] == "model" else "template")
    assert reply2["routing"]["code"] == "disabled" and reply2["source"] in ("model", "template")


def test_without_an_escalation_section_every_answer_is_local(running_agent: RunningAgent) -> None:
    running_agent.publish("sensors/temperature", "21.5")
    time.sleep(0.3)
    reply, _ = ask(running_agent, route="remote")
    assert reply["source"] in ("model", "template")
    assert reply["routing"]["escalation_error"] is None and reply["routing"]["upstream_ms"] is None


# ---------------------------------------------------------------- the request and the config


@pytest.mark.parametrize("route", ["cloud", "", 5, ["remote"], True])
def test_an_invalid_route_is_a_bad_request(running_agent: RunningAgent, route: Any) -> None:
    with running_agent.client() as c:
        reply = c.request("query", {"question": QUESTION, "route": route}, 10)
    assert reply["type"] == "error" and reply["code"] == "bad_request"
    assert reply["message"].startswith("route must be one of local, auto, remote")


GOOD = {"url": "http://127.0.0.1:9", "model": "m", "privacy": "facts"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"timeout_s": 0}, "escalation.timeout_s: must be more than 0"),
        ({"url": "ftp://gw/"}, "escalation.url: 'ftp://gw/' must be http://"),
        ({"privacy": "all"}, "escalation.privacy: 'all' must be none, facts or facts_and_question"),
        ({"api_key_file": "/nonexistent/key"}, "escalation.api_key_file: cannot read"),
        ({"max_tokens": 0}, "escalation.max_tokens: expected an integer within 1..8192"),
        ({"confidence_threshold": 1.5}, "escalation.confidence_threshold: 1.5 must be"),
        ({"min_remote_s": -1}, "escalation.min_remote_s: -1.0 must be within 0..600"),
    ],
)
def test_a_bad_escalation_value_is_refused_naming_the_key(change: dict[str, Any], message: str) -> None:
    cfg = config_from_mapping({"device_id": "d", "escalation": {**GOOD, **change}}, env={})
    with pytest.raises(ConfigError) as info:
        hybrid_from(cfg.escalation)
    assert info.value.code == "bad_config" and info.value.message.startswith(message), info.value.message


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"url": "http://gw", "model": "m"}, "escalation.privacy: required key is missing"),
        ({**GOOD, "retries": 2}, "escalation.retries: unknown key"),
        ({**GOOD, "timeout_s": "soon"}, "escalation.timeout_s:"),
        ("on", "escalation: expected a mapping"),
    ],
)
def test_the_loader_refuses_a_malformed_section(section: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"device_id": "d", "escalation": section}, env={})
    assert info.value.message.startswith(message), info.value.message


def test_the_settings_defaults_are_the_escalation_modules() -> None:
    """agent/config.py may not import agent/answers: its copy of the defaults must agree."""
    from agent.answers.routing import RoutingPolicy

    cfg = config_from_mapping({"device_id": "d", "escalation": GOOD}, env={})
    hybrid = hybrid_from(cfg.escalation)
    assert hybrid.escalator is not None
    assert hybrid.escalator.config == esc.EscalationConfig.from_mapping(GOOD)
    assert hybrid.policy == RoutingPolicy()
    with_key = config_from_mapping({"device_id": "d", "escalation": {**GOOD, "api_key": "sk-x"}}, env={})
    assert "sk-x" not in repr(with_key)


def test_edge_agent_run_refuses_a_bad_escalation_section(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": "d1",
                "state_dir": str(tmp_path / "state"),
                "escalation": {**GOOD, "url": "https://gw:8443", "ca_file": str(tmp_path / "missing.pem")},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "edge-agent: error [bad_config]: escalation.ca_file: cannot load" in done.stderr, done.stderr


def test_start_and_reload_refuse_a_bad_section_and_reload_keeps_the_running_one(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer, tmp_path: Path
) -> None:
    bad = agent_config(broker.url, tiny_pack_path, escalation={**GOOD, "temperature": 3})
    with pytest.raises(ConfigError, match=r"^escalation\.temperature: expected a number within 0\.\.2"):
        Agent(bad).start()

    good = {"url": server.url, "model": "tiny", "privacy": "facts_and_question", "max_tokens": 8}
    cfg = agent_config(broker.url, tiny_pack_path, escalation=good)
    path = tmp_path / "agent.yaml"
    data = {
        "device_id": cfg.device_id,
        "mqtt": {"url": broker.url},
        "pack": {"path": str(tiny_pack_path), "threads": 1},
        "prompt": {"max_tokens": 16, "system": "Be brief."},
        "state_dir": cfg.state_dir,
        "escalation": {**good, "privacy": "nothing"},
    }
    path.write_text(yaml.safe_dump(data))
    ra = start_agent(cfg, broker, path)
    running = ra.agent.hybrid
    with pytest.raises(ConfigError, match=r"^escalation\.privacy: 'nothing'"):
        ra.agent.reload()
    assert ra.agent.hybrid is running and ra.agent.cfg.escalation == cfg.escalation
    data["escalation"] = {**good, "privacy": "none"}
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).escalation is not None
    ra.agent.reload()
    assert ra.agent.hybrid.escalation == "off"  # applied at once, no restart
    reply, _ = ask(ra, route="remote")
    assert server.requests == [] and reply["routing"]["code"] == "disabled"


# ---------------------------------------------------------------- counters


def test_routing_is_counted_in_status_and_telemetry(
    broker: LocalBroker, tiny_pack_path: Path, start_agent: Any, server: OpenAIServer
) -> None:
    answers_with(server, GOOD_TEXT)
    ra = start(broker, tiny_pack_path, start_agent, server)
    ra.agent.metrics.take()  # a fresh interval
    ask(ra, route="remote")
    ask(ra, route="local")
    server.mode = "cut_early"
    ask(ra, route="remote")
    with ra.client() as c:
        status = c.request("cmd", {"cmd": "status"}, 10)["result"]
    routing = status["routing"]
    assert routing["route"] == {"remote": 2, "local": 1}
    assert routing["escalated"] == 1 and routing["escalation_failed"] == {"offline": 1}
    assert routing["decision"]["escalate_first"] == {"requested": 2}
    assert (
        sum(routing["decision"].get("local", {}).values())
        + sum(routing["decision"].get("template", {}).values())
        == 1
    )
    answers = ra.agent.metrics.take()["answers"]
    assert answers["count"] == 3 and answers["routes"] == {"remote": 2, "local": 1}
    assert answers["escalated"] == 1 and answers["escalation_failed"] == {"offline": 1}
