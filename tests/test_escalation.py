"""Escalation against a real HTTP server speaking the OpenAI chat-completions API around the
project's own engine (tests/openai_server.py): answers, every fault and its reason, the
deadline never passed, privacy byte for byte, the key kept out of logs, TLS with a private CA."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.answers import escalation as esc
from agent.answers.escalation import (
    EscalationConfig,
    EscalationFailed,
    EscalationPrompt,
    Escalator,
    build_messages,
    request_body,
)
from agent.inference import LoadedPack
from tests.certs import make_pki
from tests.openai_server import OpenAIServer

EPSILON_S = 0.1  # thread wake-up and scheduling on a loaded test machine
KEY = "sk-test-4f1c9a0b7e2d"
PROMPT = EscalationPrompt(
    facts="Sensor reading: the soil moisture is 18.9 %.",
    verdicts=("soil moisture: too_dry (below 25 %)",),
    question="Should I water bed two before the frost tonight?",
)


@pytest.fixture()
def server(tiny_pack: LoadedPack) -> Iterator[OpenAIServer]:
    with OpenAIServer(tiny_pack) as s:
        yield s


def escalator(url: str, **overrides: Any) -> Escalator:
    data: dict[str, Any] = {"url": url, "model": "tiny", "privacy": "facts_and_question", "max_tokens": 8}
    data.update(overrides)
    return Escalator(EscalationConfig.from_mapping(data))


def fails(e: Escalator, deadline_in_s: float = 5.0, prompt: EscalationPrompt = PROMPT) -> EscalationFailed:
    with pytest.raises(EscalationFailed) as info:
        e.complete(prompt, time.monotonic() + deadline_in_s)
    return info.value


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- answers


def test_a_good_completion_carries_text_usage_and_latency(server: OpenAIServer) -> None:
    e = escalator(server.url, api_key=KEY)
    result = e.complete(PROMPT, time.monotonic() + 10)
    [req] = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["Content-Type"] == "application/json"
    assert req.body == request_body(e.config, build_messages(PROMPT, "facts_and_question"))
    # the same greedy answer the server's engine gives for that request
    want = json.loads(server.answer(json.loads(req.body)))
    assert result.text == want["choices"][0]["message"]["content"].strip() and result.text
    assert result.usage == want["usage"] and result.usage["completion_tokens"] >= 1
    assert result.model == "tiny" and result.finish_reason in ("stop", "length")
    assert 0 < result.latency_s < 10


def test_a_base_url_ending_in_v1_is_not_doubled(server: OpenAIServer) -> None:
    escalator(server.url + "/v1/").complete(PROMPT, time.monotonic() + 10)
    assert [r.path for r in server.requests] == ["/v1/chat/completions"]


def test_slow_but_within_the_deadline_answers(server: OpenAIServer) -> None:
    server.mode, server.delay_s = "slow", 0.3
    assert escalator(server.url).complete(PROMPT, time.monotonic() + 5).text


# ---------------------------------------------------------------- faults and their reasons


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("error", "http_error"),
        ("garbage", "bad_response"),
        ("shape", "bad_response"),
        ("empty", "bad_response"),
        ("deep", "bad_response"),
        ("big", "bad_response"),
        ("cut", "offline"),
        ("cut_early", "offline"),
    ],
)
def test_each_fault_has_its_reason(server: OpenAIServer, mode: str, reason: str) -> None:
    server.mode = mode
    start = time.monotonic()
    failed = fails(escalator(server.url), 5)
    assert failed.reason == reason, failed
    assert time.monotonic() - start < 2  # a fault is reported when it happens, not at the deadline


def test_http_error_keeps_the_status_and_200_chars_of_the_body_without_the_key(server: OpenAIServer) -> None:
    server.mode = "error"
    failed = fails(escalator(server.url, api_key=KEY))
    assert failed.status == 500
    assert failed.detail.startswith("HTTP 500: internal error: the request had Authorization: Bearer ***")
    assert len(failed.detail) <= len("HTTP 500: ") + 200
    assert KEY not in str(failed) and KEY not in failed.detail


def test_nothing_listening_is_offline_at_once() -> None:
    start = time.monotonic()
    assert fails(escalator(f"http://127.0.0.1:{closed_port()}")).reason == "offline"
    assert time.monotonic() - start < 1


def test_a_name_that_does_not_resolve_is_offline() -> None:
    assert fails(escalator("http://no-such-gateway.invalid:8080"), 3).reason == "offline"


# ---------------------------------------------------------------- the deadline


@pytest.mark.parametrize("mode", ["hang", "slow", "drip"])
def test_the_deadline_is_never_passed(server: OpenAIServer, mode: str) -> None:
    """hang: no byte ever; slow: the answer comes after the deadline; drip: a byte every 50 ms,
    so no single recv ever times out and only the hard cap can stop it."""
    server.mode, server.delay_s = mode, 3.0
    deadline = time.monotonic() + 0.6
    failed = fails_by(escalator(server.url, timeout_s=30), deadline)
    assert failed.reason == "timeout"
    assert time.monotonic() <= deadline + EPSILON_S


def test_cut_mid_answer_fails_before_the_deadline(server: OpenAIServer) -> None:
    server.mode = "cut"
    deadline = time.monotonic() + 0.6
    assert fails_by(escalator(server.url), deadline).reason == "offline"
    assert time.monotonic() <= deadline + EPSILON_S


def test_timeout_s_caps_a_later_request_deadline(server: OpenAIServer) -> None:
    server.mode = "hang"
    start = time.monotonic()
    assert fails_by(escalator(server.url, timeout_s="400ms"), start + 30).reason == "timeout"
    assert time.monotonic() - start <= 0.4 + EPSILON_S


def test_a_deadline_already_passed_sends_nothing(server: OpenAIServer) -> None:
    assert fails_by(escalator(server.url), time.monotonic() - 0.01).reason == "timeout"
    assert server.requests == []


def fails_by(e: Escalator, deadline: float) -> EscalationFailed:
    with pytest.raises(EscalationFailed) as info:
        e.complete(PROMPT, deadline)
    return info.value


def test_a_stuck_name_lookup_cannot_hold_the_call_and_stragglers_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Name resolution ignores socket timeouts: only the worker thread keeps the deadline.
    Workers left behind are bounded; past MAX_STRAGGLERS a call fails at once."""
    release = threading.Event()
    real = socket.getaddrinfo

    def stuck(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    e = escalator(f"http://localhost:{closed_port()}")
    try:
        for _ in range(3 * esc.MAX_STRAGGLERS):  # a worker starved before its lookup is no straggler
            deadline = time.monotonic() + 0.2
            assert fails_by(e, deadline).reason == "timeout"
            assert time.monotonic() <= deadline + EPSILON_S
            if esc._stragglers_full():
                break
        start = time.monotonic()
        failed = fails_by(e, start + 5)
        assert failed.reason == "offline" and "still wait" in failed.detail
        assert time.monotonic() - start < 0.1
    finally:
        release.set()
    # once the lookups return, the workers end (connection refused) and calls go out again
    for _ in range(100):
        if esc._stragglers._value == esc.MAX_STRAGGLERS:
            break
        time.sleep(0.05)
    assert esc._stragglers._value == esc.MAX_STRAGGLERS
    assert "refused" in fails_by(e, time.monotonic() + 2).detail


# ---------------------------------------------------------------- privacy


SYSTEM_JSON = json.dumps(esc.SYSTEM_PROMPT)
FACTS_JSON = json.dumps(
    "Facts:\nSensor reading: the soil moisture is 18.9 %.\n\nVerdicts:\n- soil moisture: too_dry (below 25 %)"
)[:-1]  # the user message goes on after this


def expected_body(tail: str) -> bytes:
    return (
        '{"model":"tiny","messages":[{"role":"system","content":' + SYSTEM_JSON + "},"
        '{"role":"user","content":' + FACTS_JSON + tail + '"}],"max_tokens":8,"temperature":0.0}'
    ).encode()


@pytest.mark.parametrize(
    ("privacy", "tail"),
    [
        ("facts_and_question", "\\n\\nQuestion: Should I water bed two before the frost tonight?"),
        ("facts", "\\n\\n" + esc.QUESTION_WITHHELD),
    ],
)
def test_what_is_sent_is_exactly_what_privacy_allows(server: OpenAIServer, privacy: str, tail: str) -> None:
    escalator(server.url, privacy=privacy).complete(PROMPT, time.monotonic() + 10)
    [req] = server.requests
    assert req.body == expected_body(tail)
    if privacy == "facts":
        assert b"frost" not in req.body and b"water bed" not in req.body
        assert PROMPT.question not in json.loads(req.body)["messages"][1]["content"]


def test_privacy_facts_never_sends_a_non_ascii_question_in_any_encoding(server: OpenAIServer) -> None:
    question = "Faut-il arroser la serre n° 2 avant le gel ?"
    prompt = EscalationPrompt(PROMPT.facts, PROMPT.verdicts, question)
    escalator(server.url, privacy="facts").complete(prompt, time.monotonic() + 10)
    body = server.requests[0].body
    for form in (question, json.dumps(question)[1:-1], "arroser", "gel ?"):
        assert form.encode() not in body


def test_privacy_none_sends_nothing(server: OpenAIServer) -> None:
    failed = fails(escalator(server.url, privacy="none"))
    assert failed.reason == "disabled" and server.requests == []
    assert not EscalationConfig.from_mapping({"url": server.url, "model": "m", "privacy": "none"}).enabled


def test_privacy_facts_without_facts_sends_nothing(server: OpenAIServer) -> None:
    failed = fails(escalator(server.url, privacy="facts"), prompt=EscalationPrompt("", (), "What is NPK?"))
    assert failed.reason == "disabled" and server.requests == []


def test_privacy_facts_refuses_a_facts_block_that_holds_the_question(server: OpenAIServer) -> None:
    """The likely integration slip: the local prompt (facts, then the question) passed as facts."""
    whole = f"{PROMPT.facts}\n\nQuestion: {PROMPT.question}"
    failed = fails(
        escalator(server.url, privacy="facts"), prompt=EscalationPrompt(whole, (), PROMPT.question)
    )
    assert failed.reason == "disabled" and server.requests == []


# ---------------------------------------------------------------- the key


def test_the_key_goes_in_the_bearer_header_and_nowhere_else(server: OpenAIServer) -> None:
    e = escalator(server.url, api_key=KEY)
    with structlog.testing.capture_logs() as logs:
        e.complete(PROMPT, time.monotonic() + 10)
        server.mode = "error"  # echoes the Authorization header in its body
        failed = fails(e)
        server.mode = "hang"
        fails_by(e, time.monotonic() + 0.2)
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in server.requests[0].body.decode()
    assert [x["event"] for x in logs] == ["escalation_done", "escalation_failed", "escalation_failed"]
    assert KEY not in repr(logs) and KEY not in str(failed) and KEY not in repr(e.config)


def test_the_key_can_come_from_a_file(server: OpenAIServer, tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    escalator(server.url, api_key_file=str(tmp_path / "key")).complete(PROMPT, time.monotonic() + 10)
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"


def test_no_key_no_authorization_header(server: OpenAIServer) -> None:
    escalator(server.url).complete(PROMPT, time.monotonic() + 10)
    assert "Authorization" not in server.requests[0].headers


# ---------------------------------------------------------------- TLS


@pytest.fixture()
def tls_server(tiny_pack: LoadedPack, tmp_path: Path) -> Iterator[tuple[OpenAIServer, dict[str, Path]]]:
    pki = make_pki(tmp_path)
    with OpenAIServer(
        tiny_pack, tls=(pki["server"].with_suffix(".pem"), pki["server"].with_suffix(".key"))
    ) as s:
        yield s, pki


def test_https_with_the_private_ca_works(tls_server: tuple[OpenAIServer, dict[str, Path]]) -> None:
    server, pki = tls_server
    ca = str(pki["ca"].with_suffix(".pem"))
    assert escalator(server.url, ca_file=ca, api_key=KEY).complete(PROMPT, time.monotonic() + 10).text
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    # by name too: the certificate is for localhost and 127.0.0.1
    localhost = server.url.replace("127.0.0.1", "localhost")
    assert escalator(localhost, ca_file=ca).complete(PROMPT, time.monotonic() + 10).text


def test_https_with_an_unknown_ca_is_refused_as_tls(
    tls_server: tuple[OpenAIServer, dict[str, Path]], tmp_path: Path
) -> None:
    server, _ = tls_server
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other")
    for overrides in ({}, {"ca_file": str(other["ca"].with_suffix(".pem"))}):  # system store, a wrong CA
        failed = fails(escalator(server.url, api_key=KEY, **overrides))
        assert failed.reason == "tls" and "certificate" in failed.detail
    assert server.requests == []  # nothing, the key included, went out
    for _ in range(100):  # the server counts a failed handshake on its own thread, maybe later
        if server.tls_failures == 2:
            break
        time.sleep(0.02)
    assert server.tls_failures == 2


def test_plain_http_to_a_tls_server_is_offline(tls_server: tuple[OpenAIServer, dict[str, Path]]) -> None:
    server, _ = tls_server
    assert fails(escalator(server.url.replace("https", "http"))).reason in ("offline", "bad_response")


# ---------------------------------------------------------------- configuration


GOOD = {"url": "https://gw.local:8443", "model": "qwen2.5-7b", "privacy": "facts"}


def test_a_minimal_config_and_its_defaults() -> None:
    cfg = EscalationConfig.from_mapping(GOOD)
    assert (cfg.timeout_s, cfg.max_tokens, cfg.temperature, cfg.api_key, cfg.ca_file) == (
        8.0,
        256,
        0.0,
        None,
        None,
    )
    assert cfg.endpoint == "https://gw.local:8443/v1/chat/completions" and cfg.enabled
    assert EscalationConfig.from_mapping({**GOOD, "timeout_s": "1500ms"}).timeout_s == 1.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": None}, "escalation.url: required"),
        ({"model": None}, "escalation.model: required"),
        ({"privacy": None}, "escalation.privacy: required"),
        ({"privacy": "all"}, "escalation.privacy: 'all' must be none, facts or facts_and_question"),
        ({"url": "ftp://gw/"}, "escalation.url: 'ftp://gw/' must be http://"),
        ({"url": "https://user:pw@gw/"}, "escalation.url: credentials in the URL"),
        ({"url": "https://gw/?a=1"}, "escalation.url: a base URL has no query"),
        ({"url": "https://gw:99999/"}, "escalation.url: 'https://gw:99999/' is not a URL"),
        ({"timeout_s": 0}, "escalation.timeout_s: must be more than 0"),
        ({"timeout_s": "soon"}, "escalation.timeout_s: expected a duration"),
        ({"max_tokens": 0}, "escalation.max_tokens: expected an integer within 1..8192"),
        ({"temperature": 3}, "escalation.temperature: expected a number within 0..2"),
        ({"api_key": "a b"}, "escalation.api_key: must be printable ASCII"),
        ({"api_key": "k", "api_key_file": "/k"}, "escalation.api_key_file: give api_key or api_key_file"),
        ({"api_key_file": "/nonexistent/key"}, "escalation.api_key_file: cannot read"),
        ({"ca_file": "/nonexistent/ca.pem"}, "escalation.ca_file: cannot load"),
        ({"url": "http://gw", "ca_file": "/x"}, "escalation.ca_file: set for an http:// url"),
        ({"retries": 2}, "escalation.retries: unknown key (known: api_key, api_key_file, ca_file,"),
    ],
)
def test_bad_configs_name_the_key(change: dict[str, Any], message: str) -> None:
    data = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ValueError) as info:
        EscalationConfig.from_mapping(data)
    assert str(info.value).startswith(message), str(info.value)


def test_a_bad_key_value_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        EscalationConfig.from_mapping({**GOOD, "api_key": "secret value"})
    assert "secret" not in str(info.value)
