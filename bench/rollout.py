"""Rollout fan-out: how long one wave of 1,000 devices takes to go out and to be seen.

Prints one JSON line. A private mosquitto, ``--devices`` simulated devices (fleet/simulator,
one process) and, in this process, the fleet service's parts as ``edge-fleet service`` runs
them: an ingest worker, the rollout driver (tick 0.2 s) with its real signer and publisher,
and the store (an SQLite file, or ``--db postgresql://...``). Each round starts a rollout of
one wave over every device (``waves=100%``, the next version each round) and reads from the
store, relative to the moment the wave started:

- ``fanout_s``: the last instruction acknowledged by the broker (``published_at``);
- ``acks_s``: the fleet has an update event (the device's first answer) from every device;
- ``confirmed_s``: every device's status names the new version (the rollout is complete
  apart from its soak).

The simulated devices answer with ``--step-delay`` between their events (a real agent takes
seconds to minutes to download and gate a pack; this measures the fleet's side). Rounds are
repeated; the median and the spread (min, max) of each figure are reported.

    python bench/rollout.py [--devices 1000] [--rounds 3] [--db PATH_OR_URL]
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:  # bench/fleet.py shadows fleet
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from agent.localbroker import LocalBroker
from agent.logs import configure_logging
from fleet.api.app import create_app
from fleet.api.auth import TokenFile, add_token
from fleet.operators import create_operator_key, signing_key
from fleet.rollouts.driver import RolloutDriver
from fleet.rollouts.sender import Publisher, Signer
from fleet.rollouts.store import RolloutStore
from fleet.simulator.config import SimConfig
from fleet.simulator.fleet import Fleet, raise_nofile_limit
from fleet.telemetry import schema
from fleet.telemetry.ingest import IngestConfig, IngestWorker
from fleet.telemetry.store import TelemetryStore


def _round(
    client: TestClient, admin: dict[str, str], store: TelemetryStore, version: str, n: int
) -> dict[str, float]:
    r = client.post("/api/v1/rollouts", json={"target": f"tiny@{version}", "waves": "100%"}, headers=admin)
    r.raise_for_status()
    rid = r.json()["id"]
    rollouts = RolloutStore(store)
    deadline = time.monotonic() + 600
    while rollouts.view(rid)["counts"].get("confirmed", 0) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"round {version}: not complete in 600 s: {rollouts.view(rid)['counts']}")
        time.sleep(0.2)
    started = rollouts.waves(rid)[0].started_at or 0.0
    d, u = schema.rollout_devices.c, schema.update_events.c
    with store.engine.connect() as conn:
        published = conn.execute(select(func.max(d.published_at)).where(d.rollout_id == rid)).scalar_one()
        confirmed = conn.execute(select(func.max(d.confirmed_at)).where(d.rollout_id == rid)).scalar_one()
        firsts = (
            select(func.min(u.received_at).label("first"))
            .where(u.rollout_id == rid, u.source == "update_status")
            .group_by(u.device_id)
            .subquery()
        )
        seen, acked = conn.execute(select(func.count(), func.max(firsts.c.first))).one()
    assert seen == n, f"update events from {seen} of {n} devices"
    return {"fanout_s": published - started, "acks_s": acked - started, "confirmed_s": confirmed - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--step-delay", type=float, default=0.05)
    p.add_argument("--db", help="SQLite file or postgresql:// URL (default: a new SQLite file)")
    args = p.parse_args()
    configure_logging("warning")
    raise_nofile_limit(2 * args.devices + 512)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    atexit.register(shutil.rmtree, tmp, True)  # nothing left behind in /tmp
    private, public, _ = create_operator_key(tmp, "fleet")
    tag = uuid.uuid4().hex[:8]
    rounds: list[dict[str, float]] = []
    (tmp / "broker").mkdir()
    with LocalBroker(workdir=tmp / "broker") as broker:
        store = TelemetryStore.open(args.db or str(tmp / "fleet.sqlite3"))
        cfg = IngestConfig(broker.url, group=f"bench{tag}", client_id=f"ingest-{tag}")
        worker = IngestWorker(cfg, store)
        worker.start()
        publisher = Publisher(cfg, f"driver-{tag}")
        publisher.start()
        driver = RolloutDriver(
            RolloutStore(store),
            Signer(signing_key(private)),
            publisher.publish,
            publisher.refusals,
            "bench",
            "edge",
            0.2,
        )
        stop = threading.Event()
        threading.Thread(target=driver.run, args=(stop,), daemon=True).start()
        admin = {"Authorization": f"Bearer {add_token(tmp / 'tokens', 'admin', 'bench')}"}
        sim_cfg = SimConfig(
            broker=broker.url,
            devices=args.devices,
            operator_keys=(public,),
            interval_s=60.0,
            step_delay_s=args.step_delay,
            pack="tiny@1.0.0",
        )
        with Fleet(sim_cfg) as sim, TestClient(create_app(store, TokenFile(tmp / "tokens"))) as client:
            while len(store.devices()) < args.devices:
                time.sleep(0.2)
            for k in range(args.rounds):
                rounds.append(_round(client, admin, store, f"1.0.{k + 1}", args.devices))
            refused = sim.totals()["instructions_refused"]
        stop.set()
        publisher.stop()
        worker.stop()
        store.close()

    def summary(key: str) -> dict[str, float]:
        values = [r[key] for r in rounds]
        return {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }

    print(
        json.dumps(
            {
                "bench": "rollout_fanout",
                "devices": args.devices,
                "rounds": args.rounds,
                "store": "postgresql" if args.db and "://" in args.db else "sqlite",
                "step_delay_s": args.step_delay,
                "fanout_s": summary("fanout_s"),
                "acks_s": summary("acks_s"),
                "confirmed_s": summary("confirmed_s"),
                "instructions_refused": refused,
            }
        )
    )


if __name__ == "__main__":
    main()
