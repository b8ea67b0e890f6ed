"""The rollout's pure parts: the spec and its error codes, waves, device states, halt rules,
and one driver tick decided from a store snapshot (fleet/rollouts/{spec,plan,states,rules,decide}.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fleet.rollouts import decide, rules, states
from fleet.rollouts.errors import RolloutError
from fleet.rollouts.plan import assign_waves
from fleet.rollouts.spec import RolloutSpec, Rules, parse_waves
from fleet.rollouts.store import DeviceRow, Rollout, Wave

TARGET = "tiny@0.0.2"


def spec(**fields: Any) -> RolloutSpec:
    return RolloutSpec.from_json({"target": TARGET, **fields})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"target": "Tiny@1"}, "bad_target"),
        ({"target": "tiny@1.0"}, "bad_target"),
        ({"target": 5}, "bad_target"),
        ({"target": TARGET, "waves": "10%,50%"}, "bad_waves"),
        ({"target": TARGET, "waves": "0%,100%"}, "bad_waves"),
        ({"target": TARGET, "waves": "101%"}, "bad_waves"),
        ({"target": TARGET, "waves": "ten,all"}, "bad_waves"),
        ({"target": TARGET, "waves": ",".join(["all"] * 21)}, "bad_waves"),
        ({"target": TARGET, "waves": 5}, "bad_waves"),
        ({"target": TARGET, "canary": "dev-1"}, "bad_canary"),
        ({"target": TARGET, "canary": ["dev 1"]}, "bad_canary"),
        ({"target": TARGET, "canary": ["a", "a"]}, "bad_canary"),
        ({"target": TARGET, "rules": {"max_failure_rate": 2}}, "bad_rules"),
        ({"target": TARGET, "rules": {"soak_s": -1}}, "bad_rules"),
        ({"target": TARGET, "rules": {"soak_s": True}}, "bad_rules"),
        ({"target": TARGET, "rules": {"nope": 1}}, "bad_rules"),
        ({"target": TARGET, "rules": []}, "bad_rules"),
        ({"target": TARGET, "selector": 3}, "bad_request"),
        ({"target": TARGET, "surprise": 1}, "bad_request"),
        ([TARGET], "bad_request"),
    ],
)
def test_a_bad_spec_is_refused_with_its_code(body: Any, code: str) -> None:
    with pytest.raises(RolloutError) as err:
        RolloutSpec.from_json(body)
    assert err.value.code == code


def test_spec_round_trips_through_its_json() -> None:
    s = spec(selector="tag=greenhouse", waves="1%, 10%,all", canary=["c1"], rules={"soak_s": 5})
    again = RolloutSpec.from_json(s.to_json())
    assert again == s and again.rules.soak_s == 5.0 and again.rules.max_failure_rate == 0.1


def test_waves_are_cumulative_and_cover_every_device() -> None:
    devices = [f"d{i:04d}" for i in range(1000)]
    waves = assign_waves("r-1", spec(waves="1%,10%,50%,100%"), devices, set(devices))
    assert [len(w) for w in waves] == [10, 90, 400, 500]
    assert sorted(d for w in waves for d in w) == devices
    assert waves[0] != devices[:10]  # spread by hash, not by name
    assert assign_waves("r-1", spec(waves="1%,10%,50%,100%"), devices, set(devices)) == waves
    counted = assign_waves("r-1", spec(waves="3,3,all"), devices[:5], set(devices))
    assert [len(w) for w in counted] == [3, 2]  # the repeated 3 adds no empty wave


def test_canaries_come_first_and_must_be_known() -> None:
    devices = ["a", "b", "c", "d"]
    waves = assign_waves("r-1", spec(canary=["c"], waves="50%,100%"), devices, set(devices))
    assert waves[0] == ["c"] and sorted(waves[1] + waves[2]) == ["a", "b", "d"]
    with pytest.raises(RolloutError) as err:
        assign_waves("r-1", spec(canary=["ghost"]), devices, set(devices))
    assert err.value.code == "unknown_device"
    with pytest.raises(RolloutError) as err:
        assign_waves("r-1", spec(), [], set())
    assert err.value.code == "no_devices"


def test_tiny_percentages_round_up_to_one_device() -> None:
    assert [s.total(50) for s in parse_waves("1%,2%,100%")] == [1, 1, 50]


@pytest.mark.parametrize(
    ("state", "event", "code", "expected"),
    [
        (states.SENT, "downloading", None, states.DOWNLOADING),
        (states.SENT, "verifying", None, states.DOWNLOADING),
        (states.DOWNLOADING, "activated", None, states.ACTIVATED),
        (states.ACTIVATED, "downloading", None, states.ACTIVATED),  # late: only forward
        (states.ACTIVATED, "rolled_back", "health_probe", states.ROLLED_BACK),
        (states.DOWNLOADING, "rejected", "health_gate", states.FAILED),
        (states.SENT, "rejected", "incompatible", states.SKIPPED),
        (states.CONFIRMED, "rejected", "busy", states.CONFIRMED),  # final stays
        (states.SENT, "something_new", None, states.SENT),
        (states.PENDING, "activated", None, states.PENDING),  # never sent to: not its answer
        (states.OFFLINE_WAITING, "rejected", "health_gate", states.OFFLINE_WAITING),
    ],
)
def test_update_events_move_a_device_forward_only(
    state: str, event: str, code: str | None, expected: str
) -> None:
    assert states.after_event(state, event, code) == expected


def test_failure_rate_halts_over_the_threshold_only() -> None:
    r = Rules(max_failure_rate=0.1)
    ten = {f"d{i}": states.CONFIRMED for i in range(10)}
    assert rules.failure_rate(0, {**ten, "d0": states.FAILED}, r) is None  # 1/10 is not over 0.1
    halt = rules.failure_rate(0, {**ten, "d0": states.FAILED, "d1": states.ROLLED_BACK}, r)
    assert halt is not None and halt.rule == "failure_rate" and halt.devices == ["d0", "d1"]
    assert halt.figures == {"failed": 2, "devices": 10, "rate": 0.2, "max": 0.1}
    skipped = {**ten, "d0": states.FAILED, **{f"d{i}": states.SKIPPED for i in range(1, 9)}}
    assert rules.failure_rate(0, skipped, r) is not None  # 1 of the 2 judged


def metrics(
    tps: float | None, ttft: float = 100.0, ok: int = 10, bad: int = 0, ungrounded: int = 0
) -> dict[str, Any]:
    return {
        "requests": {"query": {"ok": ok, "timeout": bad}},
        "answers": {
            "count": ok,
            "ttft_ms": {"p50": ttft, "p95": ttft},
            "tokens_per_s_p50": tps,
            "ungrounded": ungrounded,
        },
    }


def test_a_tokens_per_s_drop_halts_with_the_figures() -> None:
    r = Rules(tokens_per_s_drop=0.2, min_samples=2)
    samples = {
        "slow": rules.Samples([metrics(100), metrics(100)], [metrics(50), metrics(52)]),
        "also": rules.Samples([metrics(80), metrics(80)], [metrics(40), metrics(40)]),
        "fine": rules.Samples([metrics(90), metrics(90)], [metrics(91), metrics(89)]),
    }
    halt = rules.regression(1, samples, r)
    assert halt is not None and halt.rule == "tokens_per_s" and halt.wave == 1
    assert halt.devices == ["also", "slow"]
    assert halt.figures["median_ratio"] == 0.51 and halt.figures["devices_judged"] == 3


def test_no_regression_without_enough_samples_or_change() -> None:
    r = Rules(min_samples=2)
    one_of_three = {
        "slow": rules.Samples([metrics(100)] * 2, [metrics(10)] * 2),
        "quiet": rules.Samples([metrics(100)] * 2, []),
        "new": rules.Samples([], [metrics(100)] * 2),
    }
    assert rules.regression(0, one_of_three, r) is None  # one of three judged: too few to say
    one_of_two = {"slow": one_of_three["slow"], "quiet": one_of_three["quiet"]}
    assert rules.regression(0, one_of_two, r) is not None
    assert rules.regression(0, {"d": rules.Samples([metrics(100)], [metrics(10), metrics(10)])}, r) is None
    steady = {"d": rules.Samples([metrics(100)] * 3, [metrics(95)] * 3)}
    assert rules.regression(0, steady, r) is None
    no_answers = {"d": rules.Samples([metrics(None)] * 3, [metrics(None)] * 3)}
    assert rules.regression(0, no_answers, r) is None


@pytest.mark.parametrize(
    ("after", "rule"),
    [
        (metrics(100, ttft=400), "ttft"),
        (metrics(100, ok=8, bad=2), "error_rate"),
        (metrics(100, ungrounded=3), "validation"),  # an agent older than the checks
        ({**metrics(100), "answers": {**metrics(100)["answers"], "retried": 3}}, "validation"),
    ],
)
def test_each_regression_rule(after: dict[str, Any], rule: str) -> None:
    halt = rules.regression(0, {"d": rules.Samples([metrics(100)] * 2, [after] * 2)}, Rules())
    assert halt is not None and halt.rule == rule and halt.devices == ["d"]


# ---------------------------------------------------------------- one tick, decided


def rollout(state: str = "running", current: int = 0, **rule: Any) -> Rollout:
    s = spec(canary=["c1"], waves="100%", rules={"soak_s": 10, **rule})
    return Rollout("r-0", s, state, current, None, [], "test", 0.0, 0.0, 1000.0, "me", 100.0)


def device(name: str, wave: int, state: str = states.PENDING, **fields: Any) -> DeviceRow:
    base: dict[str, Any] = {k: None for k in DeviceRow.__dataclass_fields__}
    base.update(device_id=name, wave=wave, state=state, updated_at=0.0, from_pack="tiny@0.0.1")
    base.update(fields)
    return DeviceRow(**base)


ONLINE = decide.Seen(True, "tiny@0.0.1")


def test_a_wave_starts_by_sending_to_online_devices_and_waiting_for_offline_ones() -> None:
    waves = [Wave(0, 2, None, None, None), Wave(1, 1, None, None, None)]
    devs = [device("c1", 0), device("c2", 0), device("d1", 1)]
    seen = {"c1": ONLINE, "c2": decide.Seen(False, "tiny@0.0.1"), "d1": ONLINE}
    out = decide.decide(rollout(), waves, devs, [], seen, 50.0)
    assert out.send == ["c1"] and out.waves == {0: {"started_at": 50.0}}
    assert out.devices["c2"]["state"] == states.OFFLINE_WAITING and "d1" not in out.devices


def test_events_confirm_then_the_wave_soaks_then_the_next_starts() -> None:
    r = rollout()
    waves = [Wave(0, 1, 1.0, None, None), Wave(1, 1, None, None, None)]
    devs = [device("c1", 0, states.SENT, published_at=1.0), device("d1", 1)]
    events = [decide.Event("c1", False, "activated", None, None)]
    seen = {"c1": decide.Seen(True, TARGET), "d1": ONLINE}
    out = decide.decide(r, waves, devs, events, seen, 5.0)
    assert out.devices["c1"]["state"] == states.CONFIRMED and out.devices["c1"]["activated_at"] == 5.0
    assert out.waves == {0: {"completed_at": 5.0, "soak_until": 15.0}} and out.send == []
    settled = [device("c1", 0, states.CONFIRMED), device("d1", 1)]
    soaking = [Wave(0, 1, 1.0, 5.0, 15.0), Wave(1, 1, None, None, None)]
    assert decide.decide(r, soaking, settled, [], seen, 10.0).send == []
    out = decide.decide(r, soaking, settled, [], seen, 16.0)
    assert out.rollout == {"current_wave": 1} and out.send == ["d1"]


def test_a_halting_tick_sends_nothing() -> None:
    r = rollout()
    waves = [Wave(0, 2, 1.0, None, None)]
    devs = [device("c1", 0, states.SENT, published_at=1.0), device("c2", 0, states.OFFLINE_WAITING)]
    events = [decide.Event("c1", False, "rejected", "health_gate", "gate failed")]
    seen = {"c1": ONLINE, "c2": ONLINE}  # c2 came back: it would be sent to
    out = decide.decide(r, waves, devs, events, seen, 5.0)
    assert out.halt is not None and out.halt.rule == "failure_rate" and out.send == []
    assert out.rollout["state"] == "halted" and out.devices["c1"]["reason_code"] == "health_gate"


def test_paused_rollouts_track_events_but_send_nothing() -> None:
    waves = [Wave(0, 2, 1.0, None, None)]
    devs = [device("c1", 0, states.SENT, published_at=1.0), device("c2", 0, states.OFFLINE_WAITING)]
    events = [decide.Event("c1", False, "downloading", None, None)]
    out = decide.decide(rollout("paused"), waves, devs, events, {"c1": ONLINE, "c2": ONLINE}, 5.0)
    assert out.devices["c1"]["state"] == states.DOWNLOADING and out.send == [] and out.halt is None


def test_timeouts_and_the_deadline() -> None:
    r = rollout(response_timeout_s=10, confirm_timeout_s=10)
    waves = [Wave(0, 3, 1.0, None, None)]
    devs = [
        device("a", 0, states.SENT, published_at=1.0),
        device("b", 0, states.ACTIVATED, activated_at=1.0),
        device("c", 0, states.OFFLINE_WAITING),
        device("d", 0, states.SENT, published_at=None),  # never published: no clock runs
    ]
    out = decide.decide(r, waves, devs, [], {}, 1001.0)
    assert out.devices["a"]["reason_code"] == "no_response"
    assert out.devices["b"]["reason_code"] == "not_confirmed"
    assert out.devices["c"]["state"] == states.EXPIRED and "d" not in out.devices


def test_rollback_sends_the_devices_that_took_the_new_pack_back() -> None:
    waves = [Wave(0, 4, 1.0, 2.0, 3.0)]
    devs = [
        device("took", 0, states.CONFIRMED),
        device("had", 0, states.CONFIRMED, reason_code="already_current"),
        device("failed", 0, states.FAILED),
        device("away", 0, states.ACTIVATED),
    ]
    seen = {
        "took": decide.Seen(True, TARGET),
        "had": ONLINE,
        "failed": ONLINE,
        "away": decide.Seen(False, TARGET),
    }
    out = decide.decide(rollout("rolling_back"), waves, devs, [], seen, 5.0)
    assert out.send_rollback == ["took"] and out.devices["away"]["rb_state"] == states.OFFLINE_WAITING
    assert "had" not in out.devices and "failed" not in out.devices and "state" not in out.rollout
    done = [device("took", 0, states.CONFIRMED, rb_state=states.SENT, rb_published_at=5.0)]
    events = [decide.Event("took", True, "activated", None, None)]
    out = decide.decide(rollout("rolling_back"), waves, done, events, {"took": ONLINE}, 6.0)
    assert out.devices["took"]["rb_state"] == states.CONFIRMED and out.rollout == {"state": "rolled_back"}


# ---------------------------------------------------------------- the contract in docs/rollouts.md


def test_docs_name_every_device_state_rollout_state_and_rule() -> None:
    from dataclasses import fields

    from fleet.rollouts.store import ROLLOUT_STATES
    from tests.test_docs import ROOT, rows_of

    text = (ROOT / "docs" / "rollouts.md").read_text()
    assert [r[0].strip("`") for r in rows_of(text, ["state", "meaning"])] == list(states.STATES)
    assert [r[0].strip("`") for r in rows_of(text, ["state", "the driver", "a person may"])] == list(
        ROLLOUT_STATES
    )
    documented = {r[0].split("`")[1] for r in rows_of(text, ["rule", "default", "halts when"])}
    assert documented == {
        "max_failure_rate",
        "tokens_per_s_drop",
        "ttft_rise",
        "error_rate_rise",
        "validation_rise",
    }
    for name in documented:
        row = next(r for r in rows_of(text, ["rule", "default", "halts when"]) if f"`{name}`" in r[0])
        assert float(row[1]) == getattr(Rules(), name)
    assert {f.name for f in fields(Rules)} <= set(re.findall(r"`(\w+)`", text))
