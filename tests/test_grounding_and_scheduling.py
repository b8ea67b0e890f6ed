"""Pure pieces of the agent: the numbers check, sensor picking, windows, scheduler, backoff."""

from __future__ import annotations

import contextlib
import random

import pytest

from agent.answers.picker import pick_sensors
from agent.answers.pipeline import ground
from agent.answers.prompt import build_prompt
from agent.answers.validate import validate
from agent.config import Limits, SensorConfig
from agent.errors import QueueFull, RateLimited
from agent.messages import QueryRequest, ReplyTo
from agent.scheduling import Job, RateLimiter, Scheduler
from agent.sensors.windows import Fact, SensorWindow
from agent.transport.mqtt import Backoff

FACTS = [
    Fact("temperature", 27.46, "°C", 1.0, False, "last", 3600),
    Fact("humidity", 81.0, "%", 1.0, False, "last", 3600),
]


def ungrounded_numbers(text: str, facts: list[Fact], question: str) -> list[str]:
    """The numbers check of agent/answers (what a reply's ``ungrounded`` lists)."""
    return list(validate(text, question=question, facts=facts, verdicts=()).numbers.offending)


def test_invented_number_is_flagged() -> None:
    assert ungrounded_numbers("It is 31 °C and humidity is 81 %.", FACTS, "How warm?") == ["31"]


def test_rounded_facts_and_question_numbers_are_grounded() -> None:
    text = "About 27.5 °C (27 really), humidity 81%, and your limit of 30 is not reached."
    assert ungrounded_numbers(text, FACTS, "Is it above 30 degrees?") == []


def test_more_precision_than_the_fact_is_not_grounded() -> None:
    assert ungrounded_numbers("It is 27.461 °C.", FACTS, "temp?") == ["27.461"]


def test_list_markers_are_not_claims() -> None:
    assert ungrounded_numbers("1. Open the vents\n2. Water at 81 %", FACTS, "what now?") == []


def test_sensor_selection_by_name_alias_and_unit() -> None:
    sensors = [
        SensorConfig("temperature", "°C", ("warm", "hot")),
        SensorConfig("soil_moisture", "%", ("water",)),
        SensorConfig("co2", "ppm"),
    ]

    def picked(question: str) -> list[str]:
        return [p.sensor.name for p in pick_sensors(question, sensors)]

    assert picked("Is it too hot?") == ["temperature"]
    assert picked("Do the beds need water?") == ["soil_moisture"]
    assert picked("soil moisture and ppm levels?") == ["soil_moisture", "co2"]
    assert picked("What is the capital of France?") == []


def test_a_stale_reading_is_said_to_be_stale_in_the_prompt() -> None:
    stale = Fact("humidity", 50.0, "%", 1.0, True, "last", 3600)
    sensors = [SensorConfig("humidity", "%", ("humid",))]
    g = ground("How humid?", sensors, {}, lambda name, agg, window: stale, now=100.0)
    text = build_prompt("How humid?", g.verdicts)
    assert g.verdicts[0].verdict == "unknown" and g.verdicts[0].answer is None
    assert "recent" in text and text.endswith("Question: How humid?")


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_window_aggregates_staleness_and_bounded_memory() -> None:
    clock = FakeClock()
    w = SensorWindow(SensorConfig("t", "°C", max_age_s=30, window_s=600, max_points=5), clock=clock)
    for i in range(8):
        w.add(float(i))
        clock.t += 10
    assert w.aggregate("count").value == 5.0  # bounded
    assert w.aggregate("last").value == 7.0 and w.aggregate("min").value == 3.0
    assert w.aggregate("trend").value == pytest.approx(6.0)  # 1 per 10 s = 6 per minute
    assert w.aggregate("mean", 25).value == pytest.approx(6.5)  # only the last 2 readings
    assert not w.aggregate("last").stale
    clock.t += 31
    assert w.aggregate("last").stale
    clock.t += 700
    assert w.aggregate("last").value is None and w.aggregate("count").value == 0.0


def _job(rid: str, client: str) -> Job:
    q = QueryRequest(rid, "q", None, None, None, None, None, (), True)
    return Job(q, client, ReplyTo("r", None), 0.0, 100.0)


def test_scheduler_takes_clients_in_turn() -> None:
    s = Scheduler(Limits(queue_size=20, per_client_queue=10))
    for i in range(5):
        s.submit(_job(f"a{i}", "a"))
    s.submit(_job("b0", "b"))
    s.submit(_job("c0", "c"))
    order = [s.next(0.1).id for _ in range(7)]  # type: ignore[union-attr]
    assert order[:4] == ["a0", "b0", "c0", "a1"]


def test_scheduler_limits_and_cancel() -> None:
    s = Scheduler(Limits(queue_size=3, per_client_queue=2))
    s.submit(_job("a0", "a"))
    s.submit(_job("a1", "a"))
    with pytest.raises(QueueFull, match="already has 2"):
        s.submit(_job("a2", "a"))
    s.submit(_job("b0", "b"))
    with pytest.raises(QueueFull, match="holds 3"):
        s.submit(_job("c0", "c"))
    assert s.cancel("a1", "b") is None  # only the key that sent it may cancel it
    state, job = s.cancel("a1", "a")  # type: ignore[misc]
    assert state == "queued" and job.id == "a1" and s.depth == 2
    running = s.next(0.1)
    assert running is not None and s.cancel(running.id, "a")[0] == "running" and running.cancel.is_set()  # type: ignore[index]
    assert s.cancel("nope", "a") is None


def test_fresh_client_keys_past_the_cap_share_one_queue_and_one_bucket() -> None:
    """Claiming a new key per request buys neither a new queue share nor a new bucket."""
    s = Scheduler(Limits(queue_size=64, per_client_queue=4, max_client_keys=4))
    s.submit(_job("mine", "operator"))
    for i in range(40):
        with contextlib.suppress(QueueFull):
            s.submit(_job(f"f{i}", f"flood-{i}"))
    assert s.depth == 1 + 3 + 4  # three own keys, then four in the shared overflow share
    s.submit(_job("mine2", "operator"))  # the legitimate client still has its own share
    clock = FakeClock()
    rl = RateLimiter(per_s=0.001, burst=1, max_keys=4, clock=clock)
    for i in range(4):
        rl.take(f"k{i}")  # four keys, each with a bucket in use: the cap is reached
    rl.take("fresh-1")  # the first key past the cap takes the one shared token ...
    with pytest.raises(RateLimited, match="share one bucket"):
        rl.take("fresh-2")  # ... and every other fresh key finds it empty
    clock.t += 2000.0  # the old keys' buckets refill: they are forgotten, new keys get their own
    rl.take("fresh-3")


def test_rate_limiter_refills() -> None:
    clock = FakeClock()
    rl = RateLimiter(per_s=1.0, burst=2, clock=clock)
    rl.take("x")
    rl.take("x")
    with pytest.raises(RateLimited):
        rl.take("x")
    rl.take("y")
    clock.t += 1.0
    rl.take("x")


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(0.5, 8.0, random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert delays[5] > delays[0] and max(delays) <= 8.0
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not a fixed ladder
    b.reset()
    assert b.next_delay() <= 0.5


def test_saved_readings_come_back_aged_by_the_wall_clock() -> None:
    cfg = SensorConfig(name="t", unit="°C", max_age_s=60, window_s=3600)
    mono, wall = FakeClock(), FakeClock()
    wall.t = 1_000_000.0
    before = SensorWindow(cfg, clock=mono, wall=wall)
    before.add(20.0)
    wall.t += 30
    before.add(21.0)
    saved = before.snapshot()
    after_mono, after_wall = FakeClock(), FakeClock()  # a new boot: the monotonic clock restarted
    after_mono.t, after_wall.t = 5.0, wall.t + 100  # restarted 100 s after the last reading
    after = SensorWindow(cfg, clock=after_mono, wall=after_wall)
    after.restore([*saved, (after_wall.t + 50, 99.0), (after_wall.t - 7200, 1.0)])  # future, too old: dropped
    fact = after.aggregate("last")
    assert fact.value == 21.0 and fact.stale  # 100 s old, over max_age_s: honest, not fresh
    assert after.aggregate("count").value == 2.0
