"""MQTT overhead of the agent: query latency minus engine time, and read round trips.

Prints one JSON line. A private mosquitto and the agent (``edge-agent run``, default
pack) run as their own processes on loopback; this process is the operator. For each
query, overhead = client-measured time from publish to the final reply minus the
engine's own time reported in ``usage.engine_ms`` (QoS 1 both ways, streaming on).

    python bench/mqtt.py [--queries 100] [--reads 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.localbroker import LocalBroker
from agent.logs import configure_logging
from agent.transport.client import ClientError, RequestClient

DEVICE = "bench-dev"


def _pct(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


def _wait_ready(broker: LocalBroker) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            with RequestClient(broker.url, DEVICE) as c:
                if c.request("cmd", {"cmd": "ping"}, 2)["type"] == "final":
                    return
        except ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def measure(broker: LocalBroker, queries: int, reads: int) -> dict[str, float]:
    overhead, engine, read_rt = [], [], []
    with RequestClient(broker.url, DEVICE, client="bench") as c:
        c.publish(f"edge/{DEVICE}/sensors/temperature", "21.5")
        for i in range(queries + 5):
            t0 = time.perf_counter()
            r = c.request("query", {"question": "How warm is it?", "max_tokens": 8, "seed": i}, 60)
            total_ms = (time.perf_counter() - t0) * 1000
            if i >= 5 and r["type"] == "final":  # the first few warm up
                overhead.append(total_ms - r["usage"]["engine_ms"])
                engine.append(r["usage"]["engine_ms"])
        for i in range(reads + 10):
            t0 = time.perf_counter()
            r = c.request("read", {"sensor": "temperature", "agg": "mean", "window": "5m"}, 10)
            if i >= 10 and r["type"] == "final":
                read_rt.append((time.perf_counter() - t0) * 1000)
    return {
        "queries": len(overhead),
        "query_overhead_p50_ms": _pct(overhead, 50),
        "query_overhead_p95_ms": _pct(overhead, 95),
        "engine_p50_ms": _pct(engine, 50),
        "reads": len(read_rt),
        "read_rtt_p50_ms": _pct(read_rt, 50),
        "read_rtt_p95_ms": _pct(read_rt, 95),
    }


@contextmanager
def agent_daemon() -> Iterator[tuple[LocalBroker, subprocess.Popen[bytes], Ed25519PrivateKey]]:
    """A private mosquitto and ``edge-agent run`` with the default pack, ready to answer, and
    the operator key it trusts (bench/memory.py signs its reloads with it)."""
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    operator = Ed25519PrivateKey.generate()
    (work / "operator.pub").write_bytes(
        operator.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    try:
        with LocalBroker() as broker:
            config = work / "agent.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "device_id": DEVICE,
                        "mqtt": {"url": broker.url},
                        "state_dir": str(work / "state"),
                        "sensors": [{"name": "temperature", "unit": "°C"}],
                        "log_level": "warning",
                        "limits": {"rate": {"per_s": 10000.0, "burst": 10000}},
                        "security": {"operator_keys": [str(work / "operator.pub")]},
                    }
                )
            )
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(config)], stderr=subprocess.DEVNULL
            )
            try:
                _wait_ready(broker)
                yield broker, agent, operator
            finally:
                agent.terminate()
                agent.wait(20)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--reads", type=int, default=300)
    args = p.parse_args()
    configure_logging("warning")  # stdout carries the one JSON line
    with agent_daemon() as (broker, _, _key):
        result = measure(broker, args.queries, args.reads)
    print(json.dumps({"bench": "mqtt", "qos": 1, "transport": "loopback", **result}))


if __name__ == "__main__":
    main()
