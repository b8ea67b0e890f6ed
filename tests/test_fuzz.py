"""Property-based fuzzing of every topic handler: whatever a client on the broker sends,
no exception escapes the router, every reply is a documented envelope with a documented
error code, and the agent still answers a normal request afterwards.

``make test`` runs 10,000 generated messages; ``make fuzz`` runs FUZZ_EXAMPLES (more).
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.errors as errors
from agent.transport import Inbound
from tests.test_router import Parts

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))
CODES = {
    cls.code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.AgentError)
}
KEYS = [
    "v",
    "id",
    "question",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "sensor",
    "window",
    "agg",
    "cmd",
    "target_id",
    "reply_to",
    "client",
    "rollout_id",
    "target",
]
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=80)  # surrogates too
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.sampled_from(["ping", "status", "cancel", "reload", "temperature", "mean", "5m", "tiny@1.0.0", 1]),
)
value = st.recursive(
    leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=4), max_leaves=12
)
request = st.dictionaries(st.sampled_from(KEYS), value, max_size=8)


def _raw(data: Any) -> bytes:
    try:
        return json.dumps(data).encode("utf-8", "surrogatepass")
    except (ValueError, OverflowError):
        return b"{}"


payloads = st.one_of(
    request.map(_raw),
    st.binary(max_size=300),
    st.integers(1, 3000).map(lambda n: b"[" * n),
    st.sampled_from([b"1" * 400, b"9" * 5000, b"", b"null", b"NaN", b"1e999"]),
)


@st.composite
def messages(draw: st.DrawFn, parts: Parts) -> Inbound:
    leaf_topic = draw(
        st.sampled_from(["query", "read", "cmd", "update", "sensors/temperature", "replies", "x"])
    )
    response = draw(st.one_of(st.none(), st.just("edge-ops/f/r"), any_text))
    props = draw(st.dictionaries(st.sampled_from(["client", "other"]), any_text, max_size=2))
    return Inbound(
        parts.cfg.topic(leaf_topic),
        draw(payloads),
        response,
        draw(st.none() | st.binary(max_size=8)),
        props,
        True,
        draw(st.booleans()),
    )


# rate limits and the sensor payload cap off: the parsers behind them get the whole load
PARTS = Parts(
    limits={"rate": {"per_s": 1e9, "burst": 10**9}, "max_sensor_payload_bytes": 10**6},
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.data())
def test_no_message_escapes_or_gets_an_undocumented_code(data: st.DataObject) -> None:
    before = len(PARTS.replies)
    PARTS.router.handle(data.draw(messages(PARTS)))  # must not raise
    for _, body in PARTS.replies[before:]:
        assert body["v"] == 1 and body["type"] in ("final", "error", "chunk"), body
        if body["type"] == "error":
            assert body["code"] in CODES and isinstance(body["message"], str), body
    while PARTS.scheduler.next(timeout_s=0) is not None:  # keep the queue from filling for good
        pass


def test_after_the_fuzzing_a_normal_request_is_answered() -> None:
    PARTS.send("cmd", {"id": "after", "cmd": "ping"})
    assert PARTS.reply_to("after", 5)["result"]["pong"]
