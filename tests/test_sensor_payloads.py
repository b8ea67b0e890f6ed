"""A sensor payload's own `unit` and `ts`: converted or refused with a counted reason, never
silently taken as the configured unit or as "now" (issue: `{"value": 99.9, "unit": "lb"}` was
reported in the configured kg, stamped now)."""

from __future__ import annotations

import json
import time

import pytest

from agent.config import SensorConfig, config_from_mapping
from agent.sensors.hub import SensorHub
from agent.sensors.sources import MAX_FUTURE_S, BadReading, parse_payload

SCALE = SensorConfig("load", "kg", window_s=600)


def payload(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_payload_in_another_unit_is_converted_into_the_sensors() -> None:
    assert parse_payload(payload(value=99.9, unit="lb"), SCALE).value == pytest.approx(45.3136, abs=1e-3)
    assert parse_payload(payload(value=2.5, unit="kg"), SCALE).value == 2.5
    assert parse_payload(b"2.5", SCALE).value == 2.5
    fridge = SensorConfig("fridge", "°C")
    assert parse_payload(payload(value=0, unit="°F"), fridge).value == pytest.approx(-17.7778, abs=1e-3)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (payload(value=5, unit="furlongs"), "unit"),  # unknown
        (payload(value=5, unit="°C"), "unit"),  # not a mass
        (payload(value=5, unit=7), "unit"),
        (payload(value=5, ts="yesterday"), "ts"),
        (payload(value=5, ts=True), "ts"),
        (b"[1]", "not_a_number"),
        (b"1e999", "not_a_number"),
    ],
)
def test_a_reading_that_cannot_be_placed_is_refused_with_its_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BadReading) as err:
        parse_payload(body, SCALE)
    assert err.value.reason == reason


def test_a_payloads_ts_is_honoured_within_bounds() -> None:
    now = 1_800_000_000.0
    assert parse_payload(payload(value=1, ts=now - 30), SCALE, now).age_s == pytest.approx(30)
    assert parse_payload(payload(value=1, ts=now + MAX_FUTURE_S / 2), SCALE, now).age_s == 0.0
    for ts in (now + MAX_FUTURE_S + 1, now - SCALE.window_s - 1):
        with pytest.raises(BadReading) as err:
            parse_payload(payload(value=1, ts=ts), SCALE, now)
        assert err.value.reason == "ts"


def test_the_hub_stores_converted_and_dated_readings_and_counts_refusals_by_reason() -> None:
    cfg = config_from_mapping(
        {"device_id": "d", "sensors": [{"name": "load", "unit": "kg", "window_s": 600}]}, env={}
    )
    hub = SensorHub(cfg)
    topic = cfg.topic("sensors/load")
    now = time.time()
    hub.ingest(topic, payload(value=10, ts=now))
    hub.ingest(topic, payload(value=22.0462, unit="lb", ts=now - 60))  # older, arrives later
    hub.ingest(topic, payload(value=1, unit="°C"))
    hub.ingest(topic, payload(value=1, ts=now + 3600))
    last = hub.read("load", "last", None)
    assert last.value == 10 and last.ts == pytest.approx(now, abs=1.0)  # the newest measurement
    assert hub.read("load", "min", None).value == pytest.approx(10.0, abs=1e-3)
    assert hub.read("load", "count", None).value == 2
    (summary,) = hub.summary()
    assert summary["accepted"] == 2 and summary["rejected"] == 2
    assert summary["rejected_by_reason"] == {"unit": 1, "ts": 1}
