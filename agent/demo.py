"""``make demo``: broker, agent, simulated greenhouse sensors, and real answers.

Spawns a private mosquitto on a free port, the agent (``edge-agent run``) with the
default pack, and a simulator publishing temperature, humidity and soil moisture with
noise and a trend; then asks questions through the operator CLI and prints the answers
with their latency. The sensors carry a ``meaning`` (bands), so two more questions show what
the agent computes without the model: a verdict ("Should I water the plants?" at about 19 %
soil moisture, in the ``too_dry`` band) and a comparison ("Is the humidity above 80 %?"). For
each the demo prints the verdict computed from the rules, the model's first try as it
streamed, the final answer with its ``source`` (model or template) and ``retries``, and the
``checks`` of the text (docs/answers.md).

The demo exits non-zero when a question or read fails (an error reply, no reply in time, the
CLI's own failure), so ``make demo`` fails too. Its folder (``edge-demo-*``: the agent's config,
state and log) and the broker's are removed at the end, unless it failed: then the agent's log
is kept and the demo says where.
"""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from agent.config import MqttConfig
from agent.localbroker import BrokerUnavailable, LocalBroker
from agent.logs import configure_logging
from agent.transport import MqttTransport
from agent.transport.client import ClientError, RequestClient

DEVICE = "greenhouse-demo"
QUESTIONS = (
    "What is the temperature in the greenhouse right now?",
    "How humid is the air?",
    "Is the soil moisture low?",
)
# Answered from rules (the sensors' meaning), phrased by the model, checked: shown in full.
VERDICT_QUESTIONS = (
    "Should I water the plants?",
    "Is the humidity above 80 %?",
)
ANSWER_TIMEOUT_S = 300.0
"""How long one question may take on a slow workstation before the demo calls it failed."""
SENSORS = [
    {
        "name": "temperature",
        "unit": "°C",
        "aliases": ["temp", "warm", "hot", "cold"],
        "max_age_s": 30,
        "meaning": "too_cold < 15 <= ok <= 30 < too_hot",
    },
    {
        "name": "humidity",
        "unit": "%",
        "aliases": ["humid", "air moisture", "damp"],
        "max_age_s": 30,
        "meaning": "too_dry < 40 <= ok <= 80 < too_humid",
    },
    {
        "name": "soil_moisture",
        "unit": "%",
        "aliases": ["soil", "water", "watering"],
        "max_age_s": 30,
        "meaning": {
            "bands": "too_dry < 25 <= ok <= 60 < too_wet",
            "description": "volumetric water content of the beds",
        },
    },
]


def simulate(broker: LocalBroker, stop: threading.Event) -> None:
    """Greenhouse readings every 0.5 s: warming air, slowly drying soil, some noise."""
    sensors = MqttTransport(MqttConfig(url=broker.url), "greenhouse-sim", [], persistent=False)
    sensors.connect()
    rng, t0 = random.Random(7), time.monotonic()
    while not stop.is_set():
        t = time.monotonic() - t0
        values = {
            "temperature": 24.0 + 0.05 * t + rng.gauss(0, 0.1),
            "humidity": 68.0 + 3 * math.sin(t / 20) + rng.gauss(0, 0.3),
            "soil_moisture": 19.0 - 0.02 * t + rng.gauss(0, 0.1),
        }
        for name, value in values.items():
            sensors.publish(f"edge/{DEVICE}/sensors/{name}", f"{value:.1f}")
        stop.wait(0.5)
    sensors.stop()


def _cli(*args: str, timeout_s: float) -> bool:
    """One operator CLI command, as a person would type it; False when it failed (its exit
    status, or no exit in time)."""
    cmd = [sys.executable, "-m", "agent.cli", *args, "--timeout", f"{timeout_s:g}"]
    try:
        return subprocess.run(cmd, check=False, timeout=timeout_s + 30).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"error: the CLI did not finish within {timeout_s + 30:g} s")
        return False


def _verdict_line(v: dict[str, Any]) -> str:
    """What the rules computed for one sensor, before the model ran."""
    asked = f"{v['op']} {v['threshold_text']}" if v.get("op") else (v.get("asked") or "value")
    answer = {True: "yes", False: "no", None: "none computed"}[v.get("answer")]
    return (
        f"{v['sensor']} = {v.get('value')} {v.get('unit', '')} (band {v.get('band')}); "
        f"asked: {asked} -> verdict {v['verdict']}, answer {answer}"
    )


def _checks_line(checks: dict[str, Any] | None) -> str:
    if not checks:
        return "-"
    return ", ".join(
        f"{k} {v if isinstance(v, str) else 'FAILED ' + str(v.get('failed'))}" for k, v in checks.items()
    )


def _explained(url: str, question: str, timeout_s: float) -> bool:
    """One query with its verdicts, the first try, the final answer, source, retries, checks;
    False when it got no final reply."""
    first: list[str] = []
    started = time.monotonic()
    try:
        with RequestClient(url, DEVICE, client="demo") as c:
            reply = c.request(
                "query",
                {"question": question, "stream": True},
                timeout_s,
                lambda ch: first.append(str(ch.get("delta", ""))),
            )
    except ClientError as exc:
        print(f"error [{exc.code}]: {exc}")
        return False
    elapsed_ms = (time.monotonic() - started) * 1000
    if reply.get("type") != "final":
        print(f"error [{reply.get('code')}]: {reply.get('message')}")
        return False
    for v in reply.get("verdicts") or []:
        print(f"  rules:       {_verdict_line(v)}")
    print(f"  model, 1st:  {''.join(first).strip()!r}")
    if reply.get("first_checks"):
        print(f"  1st checks:  {_checks_line(reply['first_checks'])}")
    print(f"  answer:      {reply.get('text')}")
    usage = reply.get("usage") or {}
    print(
        f"  source:      {reply.get('source')}, retries {reply.get('retries')}, "
        f"checks took {usage.get('checks_ms')} ms, round trip {elapsed_ms:.0f} ms"
    )
    print(f"  checks:      {_checks_line(reply.get('checks'))}")
    return True


def ask(broker_url: str, timeout_s: float = ANSWER_TIMEOUT_S) -> int:
    """The demo's questions and reads to the agent on ``broker_url``, printed as they come;
    returns how many failed."""
    target = ["--broker", broker_url, "--device", DEVICE]
    failed = 0
    for question in QUESTIONS:
        print(f"\n== {question}")
        failed += not _cli("query", *target, question, timeout_s=timeout_s)
    for question in VERDICT_QUESTIONS:
        print(f"\n== {question}  (computed from the sensors' meaning, phrased by the model, checked)")
        failed += not _explained(broker_url, question, timeout_s)
    print("\n== exact read: mean temperature over the last 10 minutes")
    read = ["read", *target, "--sensor"]
    failed += not _cli(*read, "temperature", "--window", "10m", "--agg", "mean", timeout_s=timeout_s)
    print("\n== exact read: soil moisture trend (per minute)")
    failed += not _cli(*read, "soil_moisture", "--agg", "trend", timeout_s=timeout_s)
    return failed


STEPS = len(QUESTIONS) + len(VERDICT_QUESTIONS) + 2
"""What :func:`ask` runs: the questions, the verdict questions and two exact reads."""


def main() -> int:
    configure_logging("warning")  # stdout is the demo's transcript
    try:
        broker = LocalBroker().start()
    except BrokerUnavailable as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="edge-demo-"))
    config = workdir / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": DEVICE,
                "mqtt": {"url": broker.url},
                "sensors": SENSORS,
                "state_dir": str(workdir / "state"),
                "prompt": {"max_tokens": 64},
            }
        )
    )
    stop = threading.Event()
    sim = threading.Thread(target=simulate, args=(broker, stop), daemon=True)
    sim.start()
    with (workdir / "agent.log").open("w") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)], stderr=log
        )
        code = 1
        try:
            code = _session(broker, agent, workdir)
            return code
        finally:
            agent.terminate()
            agent.wait(20)
            stop.set()
            broker.close()
            if code == 0:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"demo: failed; the agent's log is kept in {workdir / 'agent.log'}", file=sys.stderr)


def _session(broker: LocalBroker, agent: subprocess.Popen[bytes], workdir: Path) -> int:
    print(f"broker {broker.url}, agent log {workdir / 'agent.log'}; waiting for the agent...")
    deadline = time.monotonic() + 120
    while True:
        if agent.poll() is not None:
            print((workdir / "agent.log").read_text()[-2000:], file=sys.stderr)
            return 1
        try:
            with RequestClient(broker.url, DEVICE) as c:
                if c.request("cmd", {"cmd": "ping"}, 2).get("type") == "final":
                    break
        except ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    time.sleep(2)  # a few readings into the windows
    failed = ask(broker.url)
    if failed:
        print(f"\ndemo: {failed} of {STEPS} questions and reads failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
