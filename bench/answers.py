"""Answers an operator can trust, measured: the question set through the real answering path.

Every case of tests/answer_cases.yaml (or ``--cases``) is asked of the real
:class:`agent.answering.Answerer` with the default pack (a real :class:`ActivePack` over a
temporary pack store seeded from the cache, the config's prompt and sampling: greedy), a real
:class:`SensorHub` holding the case's readings, a real :class:`Scheduler`; the final reply is
taken from the ``reply`` callback, as the transport would get it. No MQTT, no escalation (no
``escalation:`` section, so every answer is local: ``escalation_rate`` is 0 by construction).

Readings go in through ``SensorHub.ingest`` (the payload's own unit converted or the reading
refused, as on a device) while the sensor windows run on an injected clock: the clock is set
``age_s`` back for each reading and then held at "now" for the whole answer, so a case's ages
and staleness are exact however long the model takes. The wall clock of the windows is the
real one at the start of the case; the answer reads ages against ``time.time()``, so they are
off by the milliseconds grounding takes.

Without validation, for comparison, from the same runs (no second mode, no switch): the query
asks for streaming, and only the first try is streamed, so the chunks joined are the model's
first text exactly (the engine's text is its deltas joined). That text is what an agent without
checks would have sent: "consistent" when the reply says the first text passed (no
``first_checks``, no retry), else the reply's ``first_checks`` say which checks it failed; its
leading Yes/No is scored like the final one (and, more leniently, its first "yes"/"no" word
anywhere: ``yes_no_anywhere_right`` of ``yes_no_anywhere_stated``); its latency is the time of
its last chunk.

Figures: ``consistent_share`` (every check of the final text passed or skipped);
``yes_no_accuracy`` over the cases whose ``expect.answer`` is true or false (the final text's
leading Yes/No against it); ``model_share`` (source model, no retry), ``retry_rate`` (the reply's
``retries`` > 0), ``rescued_by_retry_rate`` (the retry passed), ``fallback_rate`` (the template);
``validation_ms_median`` (the reply's ``usage.checks_ms``: the checks only, not the retry's
generation); ``states_reading_share`` (a rough usefulness figure, not a check: the text quotes
the value of a fresh fact at the precision written, among answers that have one);
``latency_ms_median`` and its spread (p10, p90 over answers; with ``--rounds`` > 1
also the min and max of the rounds' medians). Greedy decoding is deterministic, so more rounds
only measure latency noise.

    python bench/answers.py [--rounds 1] [--cases tests/answer_cases.yaml] [--threads 2]
                            [--records answers.jsonl]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.answering import Answerer
from agent.config import AgentConfig, PackConfig, config_from_mapping
from agent.logs import configure_logging
from agent.messages import SCHEMA_VERSION, ReplyTo, parse_query
from agent.packs.active import ActivePack, engine_factory
from agent.packs.store import PackStore
from agent.scheduling import Job, Scheduler
from agent.sensors.hub import SensorHub
from agent.sensors.windows import SensorWindow

CASES = Path(__file__).resolve().parent.parent / "tests" / "answer_cases.yaml"
DEFAULT_AGE_S = 5.0  # a reading without age_s (the case file's default)
REPLY_TO = ReplyTo("bench/answers/reply", None)
_LEAD = re.compile(r"[\s\"'*_(\[]*(yes|no)\b", re.IGNORECASE)
_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.(\d+))?")


class HeldClock:
    """A monotonic clock the bench sets: back by a reading's age to ingest it, then held."""

    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t


@dataclass
class Record:
    """One case answered once."""

    id: str
    domain: str
    kind: str
    round: int
    question: str
    expected: bool | None  # the case's expect.answer when true/false, else None
    text: str = ""
    source: str = ""  # model | template | escalated | error
    retries: int = 0
    checks: dict[str, Any] = field(default_factory=dict)
    consistent: bool = False
    yes_no: bool | None = None  # the final text's leading Yes/No
    states_reading: bool | None = None  # quotes a fresh fact's value; None: no fresh value
    first_text: str | None = None  # the model's first text (streamed chunks), None: none ran
    first_checks: dict[str, Any] | None = None
    first_consistent: bool | None = None
    first_yes_no: bool | None = None
    first_yes_no_anywhere: bool | None = None  # its first "yes"/"no" word wherever it stands
    first_states_reading: bool | None = None
    latency_ms: float = 0.0  # submit to final reply
    first_text_ms: float | None = None  # submit to the first text's last chunk
    checks_ms: float = 0.0
    error: str | None = None


def leading_yes_no(text: str) -> bool | None:
    """True for a text that starts with "Yes", False for "No", else None."""
    m = _LEAD.match(text)
    return None if m is None else m.group(1).lower() == "yes"


def yes_no_anywhere(text: str) -> bool | None:
    """The first whole word "yes" or "no" in the text, wherever it stands."""
    m = _YES_NO_WORD.search(text)
    return None if m is None else m.group(1).lower() == "yes"


def states_reading(text: str, values: list[float]) -> bool | None:
    """Whether a number in the text is one of ``values`` at the precision written (None when
    there is no value to state): a rough "it gave the reading", not a check."""
    if not values:
        return None
    for m in _NUMBER.finditer(text.replace(",", "")):
        written, decimals = float(m.group(0)), len(m.group(1) or "")
        if any(abs(written - v) <= 0.5 * 10**-decimals + 1e-9 for v in values):
            return True
    return False


def all_passed(checks: Mapping[str, Any]) -> bool:
    return bool(checks) and all(v in ("passed", "skipped") for v in checks.values())


def failed_names(checks: Mapping[str, Any] | None) -> list[str]:
    return sorted(k for k, v in (checks or {}).items() if v not in ("passed", "skipped"))


# ---------------------------------------------------------------- the agent's pieces


def open_pack(threads: int, workdir: Path, pack: Path | None = None) -> ActivePack:
    """The pack (default: the default pack in the cache) served as the agent serves it: a
    store seeded from it, booted."""
    seed = None if pack is None else str(pack)
    active = ActivePack(PackStore(workdir / "store"), engine_factory(PackConfig(threads=threads)), seed)
    active.boot()
    if active.info() is None:
        raise SystemExit(f"no pack serves: {active.error} (run `make pack`)")
    return active


def domain_config(name: str, domain: Mapping[str, Any], threads: int, workdir: Path) -> AgentConfig:
    """The agent's config for one domain: its sensors with their meaning, defaults otherwise
    (prompt, sampling, limits), no escalation."""
    return config_from_mapping(
        {
            "device_id": f"bench-{name}".replace("_", "-"),
            "sensors": domain["sensors"],
            "pack": {"threads": threads},
            "state_dir": str(workdir / "state"),
        },
        env={},
    )


def filled_hub(cfg: AgentConfig, readings: Mapping[str, Any]) -> SensorHub:
    """A hub whose windows run on a held clock, each reading ingested ``age_s`` ago."""
    hub = SensorHub(cfg)
    clock = HeldClock()
    now, offset = clock.t, time.time() - clock.t
    for s in cfg.sensors:
        hub.windows[s.name] = SensorWindow(s, clock=clock, wall=lambda: clock.t + offset)
    for s in cfg.sensors:
        r = readings.get(s.name) or {}
        series = r.get("series") or ([[r.get("age_s", DEFAULT_AGE_S), r["value"]]] if "value" in r else [])
        for age, value in series:
            payload: dict[str, Any] = {"value": value}
            if r.get("unit") is not None:
                payload["unit"] = r["unit"]
            clock.t = now - float(age)
            hub.ingest(cfg.topic(f"sensors/{s.name}"), json.dumps(payload).encode())
    clock.t = now
    return hub


def ask(active: ActivePack, cfg: AgentConfig, hub: SensorHub, rid: str, question: str) -> dict[str, Any]:
    """One query through Scheduler and Answerer.serve; the replies as they came, timed."""
    replies: list[tuple[float, dict[str, Any]]] = []
    lock = threading.Lock()

    def reply(to: ReplyTo, msg: dict[str, Any]) -> None:
        with lock:
            replies.append((time.monotonic(), msg))

    scheduler = Scheduler(cfg.limits)
    answerer = Answerer(active, scheduler, hub, lambda: cfg, reply)
    query = parse_query({"v": SCHEMA_VERSION, "id": rid, "question": question, "stream": True}, cfg.limits)
    received = time.monotonic()
    scheduler.submit(Job(query, "bench", REPLY_TO, received, received + cfg.limits.deadline_s))
    job = scheduler.next(timeout_s=1.0)
    assert job is not None
    answerer.serve(job)
    chunks = [(t, m) for t, m in replies if m.get("type") == "chunk"]
    finals = [(t, m) for t, m in replies if m.get("type") in ("final", "error")]
    assert len(finals) == 1, f"{rid}: {len(finals)} final or error replies"
    t_end, final = finals[0]
    return {
        "final": final,
        "latency_ms": (t_end - received) * 1000,
        "first_text": "".join(str(m.get("delta", "")) for _, m in chunks) if chunks else None,
        "first_text_ms": (chunks[-1][0] - received) * 1000 if chunks else None,
    }


def record(case: Mapping[str, Any], rnd: int, got: Mapping[str, Any]) -> Record:
    want = case.get("expect", {}).get("answer")
    rec = Record(
        id=case["id"],
        domain=case["domain"],
        kind=case.get("kind", ""),
        round=rnd,
        question=case["question"],
        expected=want if isinstance(want, bool) else None,
        latency_ms=round(got["latency_ms"], 1),
    )
    final = got["final"]
    if final["type"] == "error":
        rec.source, rec.error = "error", f"{final.get('code')}: {final.get('message')}"
        return rec
    rec.text, rec.source, rec.retries = final["text"], final["source"], int(final["retries"])
    rec.checks = final["checks"]
    rec.consistent = all_passed(rec.checks)
    rec.yes_no = leading_yes_no(rec.text)
    fresh = [
        float(f["value"]) for f in final.get("facts", []) if f.get("value") is not None and not f["stale"]
    ]
    rec.states_reading = states_reading(rec.text, fresh)
    rec.checks_ms = float(final["usage"]["checks_ms"])
    rec.first_checks = final.get("first_checks")
    first, first_ms = got["first_text"], got["first_text_ms"]
    template_only = rec.source == "template" and rec.retries == 0  # the model did not run
    if first is None and not template_only:
        first = ""  # the model ran and wrote nothing: no chunk
        first_ms = got["latency_ms"] if rec.retries == 0 else None
    if first is not None:
        rec.first_text = first
        rec.first_consistent = rec.first_checks is None and rec.retries == 0
        rec.first_yes_no = leading_yes_no(first)
        rec.first_yes_no_anywhere = yes_no_anywhere(first)
        rec.first_states_reading = states_reading(first, fresh)
        rec.first_text_ms = None if first_ms is None else round(first_ms, 1)
    return rec


def run(
    cases_path: Path, rounds: int, threads: int, pack: Path | None = None
) -> tuple[list[Record], dict[str, Any]]:
    data = yaml.safe_load(cases_path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="bench-answers-") as tmp:  # the store holds a pack copy
        return _run(data, cases_path, rounds, threads, Path(tmp), pack)


def _run(
    data: Mapping[str, Any],
    cases_path: Path,
    rounds: int,
    threads: int,
    workdir: Path,
    pack: Path | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    active = open_pack(threads, workdir, pack)
    configs = {name: domain_config(name, d, threads, workdir) for name, d in data["domains"].items()}
    records: list[Record] = []
    for rnd in range(rounds):
        for case in data["cases"]:
            cfg = configs[case["domain"]]
            readings = {**data["domains"][case["domain"]].get("readings", {}), **case.get("readings", {})}
            hub = filled_hub(cfg, readings)
            got = ask(active, cfg, hub, f"{case['id']}-{rnd}", case["question"])
            records.append(record(case, rnd, got))
    return records, {"pack": active.label(), "cases": len(data["cases"]), "file": str(cases_path)}


# ---------------------------------------------------------------- figures


def _share(n: int, of: int) -> float | None:
    return round(n / of, 4) if of else None


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))], 1)


def _yes_no(recs: Iterable[Record], first: bool) -> tuple[int, int]:
    scored = [r for r in recs if r.expected is not None]
    right = sum((r.first_yes_no if first else r.yes_no) == r.expected for r in scored)
    return right, len(scored)


def _states(values: Iterable[bool | None]) -> float | None:
    known = [v for v in values if v is not None]
    return _share(sum(known), len(known))


def figures(recs: list[Record]) -> dict[str, Any]:
    """With validation (the final replies) and without (the model's first texts)."""
    n = len(recs)
    answered = [r for r in recs if r.source != "error"]
    right, scored = _yes_no(recs, first=False)
    first = [r for r in recs if r.first_text is not None]
    f_right, f_scored = _yes_no(first, first=True)
    stated = [r for r in first if r.expected is not None and r.first_yes_no_anywhere is not None]
    return {
        "answers": n,
        "errors": n - len(answered),
        "consistent_share": _share(sum(r.consistent for r in recs), n),
        "yes_no_accuracy": _share(right, scored),
        "yes_no_questions": scored,
        "model_share": _share(sum(r.source == "model" and r.retries == 0 for r in recs), n),
        "retry_rate": _share(sum(r.retries > 0 for r in recs), n),
        "rescued_by_retry_rate": _share(sum(r.source == "model" and r.retries > 0 for r in recs), n),
        "fallback_rate": _share(sum(r.source == "template" for r in recs), n),
        "escalation_rate": _share(sum(r.source == "escalated" for r in recs), n),
        "states_reading_share": _states(r.states_reading for r in answered),
        "without_validation": {
            "consistent_share": _share(sum(bool(r.first_consistent) for r in first), len(first)),
            "yes_no_accuracy": _share(f_right, f_scored),
            "yes_no_questions": f_scored,
            "yes_no_anywhere_right": sum(r.first_yes_no_anywhere == r.expected for r in stated),
            "yes_no_anywhere_stated": len(stated),
            "states_reading_share": _states(r.first_states_reading for r in first),
            "model_texts": len(first),
        },
    }


def summary(recs: list[Record], rounds: int) -> dict[str, Any]:
    out = figures(recs)
    answered = [r for r in recs if r.source != "error"]
    latencies = [r.latency_ms for r in answered]
    firsts = [r.first_text_ms for r in answered if r.first_text_ms is not None]
    round_medians = [
        statistics.median(r.latency_ms for r in answered if r.round == k)
        for k in range(rounds)
        if any(r.round == k for r in answered)
    ]
    failed: Counter[str] = Counter()
    for r in recs:
        failed.update(failed_names(r.first_checks))
    out.update(
        {
            "validation_ms_median": round(statistics.median(r.checks_ms for r in answered), 2)
            if answered
            else None,
            "validation_ms_max": round(max(r.checks_ms for r in answered), 2) if answered else None,
            "latency_ms_median": round(statistics.median(latencies), 1) if latencies else None,
            "latency_ms_p10_p90": [_pct(latencies, 0.1), _pct(latencies, 0.9)] if latencies else None,
            "latency_ms_median_rounds_min_max": [round(min(round_medians), 1), round(max(round_medians), 1)]
            if round_medians
            else None,
        }
    )
    wv = out["without_validation"]
    wv["latency_ms_median"] = round(statistics.median(firsts), 1) if firsts else None
    wv["latency_ms_p10_p90"] = [_pct(firsts, 0.1), _pct(firsts, 0.9)] if firsts else None
    wv["failed_checks"] = dict(sorted(failed.items()))
    by_domain: dict[str, list[Record]] = defaultdict(list)
    for r in recs:
        by_domain[r.domain].append(r)
    out["by_domain"] = {}
    for name, rs in by_domain.items():
        f = figures(rs)
        out["by_domain"][name] = {
            "answers": f["answers"],
            "consistent_share": f["consistent_share"],
            "yes_no_accuracy": f["yes_no_accuracy"],
            "yes_no_questions": f["yes_no_questions"],
            "model_share": f["model_share"],
            "retry_rate": f["retry_rate"],
            "fallback_rate": f["fallback_rate"],
            "consistent_share_without_validation": f["without_validation"]["consistent_share"],
            "yes_no_accuracy_without_validation": f["without_validation"]["yes_no_accuracy"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=Path, default=CASES, help="the question set (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="times through the set (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="engine threads (default: 2)")
    p.add_argument("--records", type=Path, help="also write every answer as a JSON line here")
    p.add_argument("--pack", type=Path, help="the pack to answer with (default: the default pack)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    configure_logging("error")  # stdout is the one JSON line
    started = time.monotonic()
    recs, info = run(args.cases, args.rounds, args.threads, args.pack)
    if args.records is not None:
        with args.records.open("w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    out: dict[str, Any] = {
        "bench": "answers",
        "pack": info["pack"],
        "threads": args.threads,
        "cases": info["cases"],
        "rounds": args.rounds,
        "escalation": "off: no escalation section, every answer local (escalation_rate 0 by construction)",
        **summary(recs, args.rounds),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
