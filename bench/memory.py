"""Resident memory of the agent daemon after loading, after 1,000 queries and over reloads.

Prints one JSON line. A private mosquitto and ``edge-agent run`` (default pack) run as
their own processes; this process sends the queries (short answers, a few sensor
readings in between), then ``cmd reload`` 10 times (each builds a new engine and must
release the old one), and reads the agent's VmRSS/VmHWM from /proc. A leak shows as
growth between the readings.

    python bench/memory.py [--queries 1000] [--reloads 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.logs import configure_logging
from agent.transport.client import RequestClient
from bench.mqtt import DEVICE, agent_daemon
from model_packs import instructions


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _reloads(c: RequestClient, pid: int, n: int, key: Ed25519PrivateKey) -> dict[str, object]:
    """RSS after the first reload and after ``n``: flat when old engines are released."""
    rss: list[float] = []
    for i in range(n):
        signed = instructions.sign(key, "reload", DEVICE, {"v": 1, "id": f"reload-{i}"})
        r = c.request("cmd", {**signed, "cmd": "reload"}, 120)
        if r["type"] != "final":
            raise SystemExit(f"reload failed: {r}")
        rss.append(round(_status_kb(pid)["VmRSS"] / 1024, 1))
    if not rss:
        return {}
    return {
        "reloads": n,
        "rss_after_1_reload_mb": rss[0],
        f"rss_after_{n}_reloads_mb": rss[-1],
        "reload_rss_ratio": round(rss[-1] / rss[0], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--reloads", type=int, default=10)
    args = p.parse_args()
    configure_logging("warning")  # stdout carries the one JSON line
    with agent_daemon() as (broker, agent, key):
        loaded = _status_kb(agent.pid)
        failures, samples = 0, {}
        with RequestClient(broker.url, DEVICE, client="bench") as c:
            for i in range(args.queries):
                if i % 10 == 0:
                    c.publish(f"edge/{DEVICE}/sensors/temperature", str(20 + i % 7), confirm=False)
                r = c.request("query", {"question": "How warm is it?", "max_tokens": 8, "seed": i}, 60)
                failures += r["type"] != "final"
                if i + 1 in (100, args.queries // 2):
                    samples[i + 1] = round(_status_kb(agent.pid)["VmRSS"] / 1024, 1)
            after = _status_kb(agent.pid)
            reloads = _reloads(c, agent.pid, args.reloads, key)
    print(
        json.dumps(
            {
                "bench": "memory",
                "queries": args.queries,
                "failed": failures,
                "rss_after_load_mb": round(loaded["VmRSS"] / 1024, 1),
                "rss_after_queries_mb": round(after["VmRSS"] / 1024, 1),
                "growth_mb": round((after["VmRSS"] - loaded["VmRSS"]) / 1024, 1),
                "rss_mb_at": samples,  # growth that stops early is warm-up (arenas), steady growth a leak
                "peak_rss_mb": round(after["VmHWM"] / 1024, 1),
                **reloads,
            }
        )
    )


if __name__ == "__main__":
    main()
