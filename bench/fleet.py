"""Fleet telemetry ingest: messages per second stored by one worker and by two, and ingest lag.

Prints one JSON line. A private mosquitto, a throwaway PostgreSQL database on this machine
(127.0.0.1:5432, dropped at the end) and `edge-fleet ingest` workers as their own processes
(the production path). For each round, ``--devices`` fake devices' telemetry (one metrics
record per message, the documented format) is published at QoS 1 while the workers run; the
round's rate is messages / (time until the last one is stored). Rounds alternate one worker
and two workers (interleaved, this machine is shared and noisy); the median and the spread
are reported. Lag is the p95 of (stored at - record ts) over the last round of each kind.
The broker queues a whole round for the workers (no ``max_queued_messages`` limit: with the
default 10,000 it dropped what a slow worker had not taken yet, and the round never ended); a
round that stores nothing new for 30 s stops the bench with what it stored. The workers ack
each batch's devices (``acks_per_message``: telemetry acks published per message stored; one
record per message from many devices makes it close to 1, the worst case for their cost).

The API half: ``--api-devices`` devices (status documents: pack, hardware) and
``--api-points`` metrics records spread evenly over the last 24 h, written straight through
the store (``ingest_many``) into the same throwaway database after the ingest rounds, then
folded into the hourly rollups (what the service's roller keeps up with) and ANALYZEd. An
``edge-fleet service --api-only`` process serves them; one client alternates
``GET /api/v1/summary`` (24 h window) and ``GET /api/v1/devices/{id}/series?metric=rss_mb&since=24h``
(a random device's 24 h, the default step: raw records) over keep-alive HTTP, the order
swapped each request, ``--api-requests`` of each per round for ``--api-rounds`` rounds. For each
route: the median of the rounds' p95 and median latency, and the spread of the rounds' p95.

    python bench/fleet.py [--messages 20000] [--devices 1000] [--rounds 3]
                          [--api-devices 1000] [--api-points 1000000] [--api-rounds 5] [--api-requests 40]

``--api-points 0`` leaves the API half out ("api": null).

The rollout half (``"rollout"``) is bench/rollout.py run as its own process: the time to fan one
wave out to ``--rollout-devices`` simulated devices (1,000) and to see their answers, over
``--rollout-rounds`` rounds; ``--rollout-devices 0`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Run as a script, this file's folder is first on sys.path and this file (bench/fleet.py)
# would shadow the fleet package: the repository root instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import httpx
import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from agent.localbroker import LocalBroker
from fleet.api.auth import add_token
from fleet.telemetry import retention
from fleet.telemetry.payloads import Batch, Record, parse_status
from fleet.telemetry.store import TelemetryStore

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
    """``n`` workers, returned once each one logged that it subscribed: a message published
    before its group's subscription exists goes to no worker (a fixed 2 s wait lost the first
    few hundred messages of a round when the machine was busy, and the round never ended)."""
    procs, logs = [], []
    for i in range(n):
        argv = [sys.executable, "-m", "fleet.cli", "ingest", "--broker", broker.url, "--db", db]
        argv += ["--group", f"bench-{tag}", "--client-id", f"bench-{tag}-{i}", "--stats-every", "3600"]
        log = broker.dir / f"bench-{tag}-{i}.log"
        with log.open("wb") as err:
            procs.append(subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err))
        logs.append(log)
    deadline = time.monotonic() + 120
    while not all(b"ingest_subscribed" in log.read_bytes() for log in logs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit(f"bench: the {tag} workers did not subscribe (logs in {broker.dir})")
        time.sleep(0.05)
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
        before = _stored(engine) if _has_records(engine) else 0
        started = time.monotonic()
        threading.Thread(target=_publish, args=(broker, args.devices, args.messages, first_seq)).start()
        done, progress_at = 0, started
        while done < args.messages:
            time.sleep(0.05)
            now_done = _stored(engine) - before
            if now_done > done:
                done, progress_at = now_done, time.monotonic()
            elif time.monotonic() - progress_at > 30:
                raise SystemExit(
                    f"bench: {workers} worker(s) stored {done} of {args.messages}, then nothing for 30 s"
                )
        elapsed = time.monotonic() - started
        lag = _lag_p95(engine, first_seq)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        engine.dispose()
    acks = _acks_sent(broker, f"{workers}w-{first_seq}", workers)
    return {"msg_per_s": args.messages / elapsed, "lag_p95_s": lag, "acks": acks}


def _acks_sent(broker: LocalBroker, tag: str, n: int) -> float:
    """The telemetry acks the round's workers published (their ``ingest_stopped`` counters;
    0 from a worker that sends none): shows the acks' cost is in the rate measured."""
    total = 0
    for i in range(n):
        for line in (broker.dir / f"bench-{tag}-{i}.log").read_text(errors="replace").splitlines():
            if '"ingest_stopped"' in line:
                total += int(json.loads(line).get("acks", 0))
    return float(total)


def _has_records(engine: sa.Engine) -> bool:
    return sa.inspect(engine).has_table("records")


def _lag_p95(engine: sa.Engine, first_seq: int) -> float:
    with engine.connect() as c:
        rows = c.execute(
            sa.text("SELECT received_at - ts FROM records WHERE seq >= :s"), {"s": first_seq}
        ).all()
    lags = sorted(float(r[0]) for r in rows)
    return lags[int(0.95 * (len(lags) - 1))] if lags else float("nan")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seed(db: str, devices: int, points: int) -> float:
    """``devices`` registered devices, ``points`` metrics records spread over the last 24 h;
    returns the seconds it took (insert and roll-up)."""
    started, now = time.monotonic(), time.time()
    names = [f"api-{i:05d}" for i in range(devices)]
    per_device = -(-points // devices)
    every_s = 86_000 / per_device
    store = TelemetryStore.open(db)
    try:
        for i, dev in enumerate(names):
            doc = {
                "v": 1,
                "device_id": dev,
                "state": "online",
                "pack": {"name": "smollm2", "version": f"1.{i % 3}.0"},
                "agent_version": "0.1.0",
                "hardware": ["aarch64", "aarch64-dotprod" if i % 2 else "aarch64-no-dotprod"],
                "tags": ["greenhouse", f"site={i % 10}"],
                "ts": now,
            }
            found = parse_status(dev, json.dumps(doc).encode())
            assert found is not None
            store.apply_status(found, now)
        pending: list[tuple[Batch, float]] = []
        for seq in range(1, per_device + 1, 50):
            for i, dev in enumerate(names):
                records = tuple(
                    Record(s, now - 86_000 + (s - 1) * every_s, "metrics", _metrics(s, i))
                    for s in range(seq, min(seq + 50, per_device + 1))
                )
                pending.append((Batch(dev, records), now))
                if len(pending) == 200:
                    store.ingest_many(pending)
                    pending = []
        store.ingest_many(pending)
        retention.roll(store)
    finally:
        store.close()
    # fresh planner statistics, as autovacuum would have them: just after a million rows came
    # and went through the rollup queue, the stale ones made every request scan the records
    analyze = sa.create_engine(db, isolation_level="AUTOCOMMIT")
    with analyze.connect() as c:
        c.execute(sa.text("ANALYZE"))
    analyze.dispose()
    return time.monotonic() - started


def _metrics(seq: int, device: int) -> dict[str, object]:
    """A metrics record's data as an agent sends it (docs/protocol.md), numbers varying."""
    return {
        "pack": {"name": "smollm2", "version": f"1.{device % 3}.0"},
        "agent_version": "0.1.0",
        "uptime_s": 60 * seq,
        "load1": 0.5 + (seq % 7) / 10,
        "cpu_temp_c": 50.0 + seq % 11,
        "rss_mb": 300.0 + (seq * 7 + device) % 50,
        "disk_free_mb": 20_000,
        "queue_depth": seq % 3,
        "requests": {"query": {"ok": 10 + seq % 5, "timeout": seq % 2}, "read": {"ok": 3}, "cmd": {"ok": 1}},
        "answers": {
            "count": 10,
            "latency_ms": {"p50": 800.0 + seq % 100, "p95": 1500.0 + seq % 300},
            "ttft_ms": {"p50": 200.0, "p95": 400.0},
            "tokens_per_s_p50": 12.5,
            "ungrounded": 0,
        },
        "reconnects": 0,
        "reply_failures": 0,
        "spool": {"records": 0, "oldest_ts": None, "dropped_total": 0},
    }


def _api(db: str, args: argparse.Namespace) -> dict[str, object]:
    seed_s = _seed(db, args.api_devices, args.api_points)
    tokens = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-fleet-tokens-{uuid.uuid4().hex[:8]}"
    token = add_token(tokens, "read", "bench")
    port = _free_port()
    argv = [sys.executable, "-m", "fleet.cli", "service", "--api-only", "--db", db, "--tokens", str(tokens)]
    argv += ["--listen", f"127.0.0.1:{port}", "--roll-every", "3600"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rnd = random.Random(1)
    latencies: dict[str, list[list[float]]] = {"summary": [], "series": []}
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("bench: the API service did not start")
                time.sleep(0.1)

            def summary() -> httpx.Response:
                return client.get("/api/v1/summary", params={"window": "24h"})

            def series() -> httpx.Response:
                dev = f"api-{rnd.randrange(args.api_devices):05d}"
                return client.get(
                    f"/api/v1/devices/{dev}/series", params={"metric": "rss_mb", "since": "24h"}
                )

            routes = {"summary": summary, "series": series}
            for name, call in routes.items():  # warm up (connections, plans), and check the answers
                response = call()
                if response.status_code != 200:
                    raise SystemExit(f"bench: {name}: {response.status_code} {response.text[:300]}")
            points = len(series().json()["points"])
            for _ in range(args.api_rounds):
                rows: dict[str, list[float]] = {"summary": [], "series": []}
                for i in range(args.api_requests):
                    order = ("summary", "series") if i % 2 == 0 else ("series", "summary")
                    for name in order:
                        t0 = time.perf_counter()
                        response = routes[name]()
                        rows[name].append(time.perf_counter() - t0)
                        response.raise_for_status()
                for name, got in rows.items():
                    latencies[name].append(got)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        tokens.unlink(missing_ok=True)
    out: dict[str, object] = {
        "devices": args.api_devices,
        "points": args.api_points,
        "seed_s": round(seed_s, 1),
        "series_points_returned": points,
        "rounds": args.api_rounds,
        "requests_per_round": args.api_requests,
    }
    for name, runs in latencies.items():
        p95s = [1000 * _pct(r, 0.95) for r in runs]
        out[f"{name}_p95_ms"] = round(statistics.median(p95s), 1)
        out[f"{name}_p95_ms_spread"] = [round(min(p95s), 1), round(max(p95s), 1)]
        out[f"{name}_median_ms"] = round(statistics.median(1000 * statistics.median(r) for r in runs), 1)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--api-devices", type=int, default=1000)
    p.add_argument("--api-points", type=int, default=1_000_000)
    p.add_argument("--api-rounds", type=int, default=5)
    p.add_argument("--api-requests", type=int, default=40)
    p.add_argument("--rollout-devices", type=int, default=1000, help="0: no rollout fan-out half")
    p.add_argument("--rollout-rounds", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("PYTHONPATH", str(REPO))
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    per_device = -(-args.messages // args.devices)
    broker = LocalBroker()
    unbounded = broker.conf.read_text().replace("max_queued_messages 10000", "max_queued_messages 0")
    broker.conf.write_text(unbounded)  # a whole round waits for the workers (see above)
    with broker, throwaway_database() as db:
        seq = 1
        for _ in range(args.rounds):
            for workers in (1, 2):  # interleaved
                results[workers].append(_round(broker, db, workers, args, seq))
                seq += per_device
        api = _api(db, args) if args.api_points > 0 else None
    out: dict[str, object] = {"bench": "fleet", "messages": args.messages, "devices": args.devices}
    medians = {}
    for workers, runs in results.items():
        rates = [r["msg_per_s"] for r in runs]
        medians[workers] = statistics.median(rates)
        out[f"ingest_msg_per_s_{workers}w"] = round(medians[workers], 1)
        out[f"ingest_msg_per_s_{workers}w_spread"] = [round(min(rates), 1), round(max(rates), 1)]
        out[f"lag_p95_s_{workers}w"] = round(runs[-1]["lag_p95_s"], 3)
    out["scaling_2w_over_1w"] = round(medians[2] / medians[1], 2)
    sent = sum(r["acks"] for runs in results.values() for r in runs)
    out["acks_per_message"] = round(sent / (args.messages * 2 * args.rounds), 3)  # telemetry acks to devices
    out["rounds"] = args.rounds
    out["api"] = api
    out["rollout"] = _rollout(args) if args.rollout_devices > 0 else None
    print(json.dumps(out))


def _rollout(args: argparse.Namespace) -> object:
    """bench/rollout.py as its own process (its own broker, store and simulated devices):
    the time to fan one wave out to ``--rollout-devices`` devices and to see their answers."""
    cmd = [sys.executable, str(REPO / "bench" / "rollout.py"), "--devices", str(args.rollout_devices)]
    done = subprocess.run(
        [*cmd, "--rounds", str(args.rollout_rounds)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
