"""``make demo``: broker, agent, simulated greenhouse sensors, and real answers.

Spawns a private mosquitto on a free port, the agent (``edge-agent run``) with the
default pack, and a simulator publishing temperature, humidity and soil moisture with
noise and a trend; then asks questions through the operator CLI and prints the answers
with their latency.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
SENSORS = [
    {"name": "temperature", "unit": "°C", "aliases": ["temp", "warm", "hot", "cold"], "max_age_s": 30},
    {"name": "humidity", "unit": "%", "aliases": ["humid", "air moisture", "damp"], "max_age_s": 30},
    {"name": "soil_moisture", "unit": "%", "aliases": ["soil", "water", "watering"], "max_age_s": 30},
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


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "agent.cli", *args]
    subprocess.run(cmd, check=False, timeout=300)


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
        try:
            return _session(broker, agent, workdir)
        finally:
            agent.terminate()
            agent.wait(20)
            stop.set()
            broker.stop()


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
    target = ["--broker", broker.url, "--device", DEVICE]
    for question in QUESTIONS:
        print(f"\n== {question}")
        _cli("query", *target, question)
    print("\n== exact read: mean temperature over the last 10 minutes")
    _cli("read", *target, "--sensor", "temperature", "--window", "10m", "--agg", "mean")
    print("\n== exact read: soil moisture trend (per minute)")
    _cli("read", *target, "--sensor", "soil_moisture", "--agg", "trend")
    return 0


if __name__ == "__main__":
    sys.exit(main())
