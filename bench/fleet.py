"""Fleet telemetry ingest: messages per second stored by one worker and by two, and ingest lag.

Prints one JSON line. A private mosquitto, a throwaway PostgreSQL database on this machine
(127.0.0.1:5432, dropped at the end) and `edge-fleet ingest` workers as their own processes
(the production path). For each round, ``--devices`` fake devices' telemetry (one metrics
record per message, the documented format) is published at QoS 1 while the workers run; the
round's rate is messages / (time until the last one is stored). Rounds alternate one worker
and two workers (interleaved, this machine is shared and noisy); the median and the spread
are reported. Lag is the p95 of (stored at - record ts) over the last round of each kind.

    python bench/fleet.py [--messages 20000] [--devices 1000] [--rounds 3]

The API half of the fleet benchmark (summary and 24 h series with 1,000 devices and 1 M
points) is not measured here yet.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from agent.localbroker import LocalBroker

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def throwaway_database() -> Iterator[str]:
    name = f"bench_fleet_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _workers(broker: LocalBroker, db: str, n: int, tag: str) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        argv = [sys.executable, "-m", "fleet.cli", "ingest", "--broker", broker.url, "--db", db]
        argv += ["--group", f"bench-{tag}", "--client-id", f"bench-{tag}-{i}", "--stats-every", "3600"]
        procs.append(subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def _stored(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.text("SELECT COUNT(*) FROM records")).scalar_one())


def _publish(broker: LocalBroker, devices: int, messages: int, first_seq: int) -> None:
    """``messages`` telemetry messages round-robin over ``devices``, QoS 1, as fast as paho goes."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    infos = []
    for i in range(messages):
        device, seq = f"bench-{i % devices:05d}", first_seq + i // devices
        record = {
            "seq": seq,
            "ts": time.time(),
            "kind": "metrics",
            "data": {"uptime_s": seq, "rss_mb": 300.0},
        }
        body = json.dumps({"v": 1, "device": device, "records": [record]})
        infos.append(client.publish(f"edge/{device}/telemetry", body, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def _round(
    broker: LocalBroker, db: str, workers: int, args: argparse.Namespace, first_seq: int
) -> dict[str, float]:
    engine = sa.create_engine(db)
    procs = _workers(broker, db, workers, f"{workers}w-{first_seq}")
    try:
        time.sleep(2.0)  # connected and subscribed (the first round also migrates the schema)
        before = _stored(engine) if _has_records(engine) else 0
        started = time.monotonic()
        threading.Thread(target=_publish, args=(broker, args.devices, args.messages, first_seq)).start()
        while _stored(engine) - before < args.messages:
            if time.monotonic() - started > 600:
                done = _stored(engine) - before
                raise SystemExit(f"bench: {workers} worker(s) stored {done} of {args.messages} in 600 s")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        lag = _lag_p95(engine, first_seq)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        engine.dispose()
    return {"msg_per_s": args.messages / elapsed, "lag_p95_s": lag}


def _has_records(engine: sa.Engine) -> bool:
    return sa.inspect(engine).has_table("records")


def _lag_p95(engine: sa.Engine, first_seq: int) -> float:
    with engine.connect() as c:
        rows = c.execute(
            sa.text("SELECT received_at - ts FROM records WHERE seq >= :s"), {"s": first_seq}
        ).all()
    lags = sorted(float(r[0]) for r in rows)
    return lags[int(0.95 * (len(lags) - 1))] if lags else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("PYTHONPATH", str(REPO))
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    per_device = -(-args.messages // args.devices)
    with LocalBroker() as broker, throwaway_database() as db:
        seq = 1
        for _ in range(args.rounds):
            for workers in (1, 2):  # interleaved
                results[workers].append(_round(broker, db, workers, args, seq))
                seq += per_device
    out: dict[str, object] = {"bench": "fleet", "messages": args.messages, "devices": args.devices}
    medians = {}
    for workers, runs in results.items():
        rates = [r["msg_per_s"] for r in runs]
        medians[workers] = statistics.median(rates)
        out[f"ingest_msg_per_s_{workers}w"] = round(medians[workers], 1)
        out[f"ingest_msg_per_s_{workers}w_spread"] = [round(min(rates), 1), round(max(rates), 1)]
        out[f"lag_p95_s_{workers}w"] = round(runs[-1]["lag_p95_s"], 3)
    out["scaling_2w_over_1w"] = round(medians[2] / medians[1], 2)
    out["rounds"] = args.rounds
    out["api"] = None  # the API half of this benchmark is not written yet
    print(json.dumps(out))


if __name__ == "__main__":
    main()
