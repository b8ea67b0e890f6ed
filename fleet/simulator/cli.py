"""``edge-fleet simulate``: N simulated devices on a real broker until stopped.

    edge-fleet simulate --devices 1000 --broker mqtt://127.0.0.1:1883 --interval 60 \\
        --operator-key ops.pub --hardware x86_64:0.5,aarch64-dotprod:0.5 --tags greenhouse \\
        --fail-share 0.1 --seed 7

Prints one JSON line when every device is connected and one with the fleet's totals at the
end; logs a stats line (connected devices, records, CPU %) every ``--stats-every`` seconds.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from fleet.simulator.config import ConfigError, Shares, SimConfig, parse_hardware
from fleet.simulator.fleet import Fleet, SimulatorError

log = structlog.get_logger("edge_fleet.simulator")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``simulate`` command to ``edge-fleet``'s subcommands."""
    p = sub.add_parser("simulate", help="simulated devices on a real broker (load and rollout tests)")
    add_options(p)


def add_options(p: argparse.ArgumentParser) -> None:
    d = SimConfig()
    p.add_argument("--devices", type=int, default=d.devices, help="how many (default %(default)s)")
    p.add_argument("--broker", default=d.broker, help="mqtt://HOST[:PORT] (default %(default)s)")
    p.add_argument("--password-file", type=Path, help="one password for every device (username: its id)")
    p.add_argument("--prefix", default=d.id_prefix, help="device id prefix (default %(default)s)")
    p.add_argument("--first", type=int, default=d.id_start, help="number of the first device")
    p.add_argument("--topic-prefix", default=d.topic_prefix, help="topic root is PREFIX/{id}")
    p.add_argument("--operator-key", action="append", type=Path, default=[], help="trusted key (repeatable)")
    p.add_argument("--interval", type=float, default=d.interval_s, help="telemetry every S seconds")
    p.add_argument("--step-delay", type=float, default=d.step_delay_s, help="seconds between update events")
    p.add_argument("--download-steps", type=int, default=d.download_steps, help="progress events after 0 %%")
    p.add_argument("--hardware", default="x86_64:1", help="mix, e.g. x86_64:0.5,aarch64-dotprod:0.5")
    p.add_argument("--tags", default="", help="config tags, comma separated (e.g. greenhouse,site=north)")
    p.add_argument("--pack", default=d.pack, help="NAME@VERSION every device starts with")
    p.add_argument("--agent-version", default=d.agent_version)
    p.add_argument("--seed", type=int, default=d.seed, help="chooses which devices misbehave")
    p.add_argument("--fail-share", type=float, default=0.0, help="rejected by the health gate")
    p.add_argument("--rollback-share", type=float, default=0.0, help="activated, then rolled back")
    p.add_argument("--regress-share", type=float, default=0.0, help="activated, then slower")
    p.add_argument("--regress-factor", type=float, default=d.regress_factor, help="tokens/s times this")
    p.add_argument("--incompatible-share", type=float, default=0.0, help="rejected as incompatible")
    p.add_argument("--offline-share", type=float, default=0.0, help="drop off after --offline-after")
    p.add_argument("--offline-after", type=float, default=d.offline_after_s, help="seconds after start")
    p.add_argument("--offline-for", type=float, default=d.offline_for_s, help="seconds away; 0: for good")
    p.add_argument("--rollback-target", action="append", default=[], help="target signed as a rollback")
    p.add_argument("--connect-rate", type=float, default=d.connect_rate, help="connections a second")
    p.add_argument("--keepalive", type=int, default=d.keepalive_s)
    p.add_argument("--max-records", type=int, default=d.max_records, help="unacknowledged records kept")
    p.add_argument(
        "--ack", choices=("fleet", "broker"), default=d.ack_mode, help="telemetry.ack of the agent"
    )
    p.add_argument("--ack-timeout", type=float, default=d.ack_timeout_s, help="resend when acks stop")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0: until SIGINT/SIGTERM")
    p.add_argument("--stats-every", type=float, default=30.0, help="seconds between stats lines")
    p.add_argument("--connect-timeout", type=float, default=120.0, help="seconds for all to connect")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    password = None
    if args.password_file is not None:
        password = args.password_file.read_text().splitlines()[0] if args.password_file.read_text() else ""
    return SimConfig(
        broker=args.broker,
        devices=args.devices,
        id_prefix=args.prefix,
        id_start=args.first,
        topic_prefix=args.topic_prefix,
        password=password,
        operator_keys=tuple(args.operator_key),
        interval_s=args.interval,
        step_delay_s=args.step_delay,
        download_steps=args.download_steps,
        hardware=parse_hardware(args.hardware),
        tags=tuple(t.strip() for t in args.tags.split(",") if t.strip()),
        pack=args.pack,
        agent_version=args.agent_version,
        seed=args.seed,
        shares=Shares(args.fail_share, args.rollback_share, args.regress_share, args.incompatible_share),
        regress_factor=args.regress_factor,
        offline_share=args.offline_share,
        offline_after_s=args.offline_after,
        offline_for_s=args.offline_for,
        rollback_targets=tuple(args.rollback_target),
        connect_rate=args.connect_rate,
        keepalive_s=args.keepalive,
        max_records=args.max_records,
        ack_mode=args.ack,
        ack_timeout_s=args.ack_timeout,
    )


def run(args: argparse.Namespace) -> int:
    """0 after a clean stop; 2 for a bad setting; 1 when the devices did not all connect."""
    try:
        fleet = Fleet(config_from_args(args))
    except (ConfigError, OSError, ValueError) as exc:
        print(f"edge-fleet simulate: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()
    previous = _on_signals(stopping)
    try:
        fleet.start(wait_s=args.connect_timeout)
        connect_s = round(fleet.connect_s or 0, 3)
        _print({"event": "connected", "devices": len(fleet.ids), "connect_s": connect_s})
        _serve(fleet, stopping, args.duration, args.stats_every)
    except SimulatorError as exc:
        print(f"edge-fleet simulate: {exc}", file=sys.stderr)
        return 1
    finally:
        fleet.stop()
        for signum, handler in previous.items():  # run() may be called in-process (tests)
            signal.signal(signum, handler)
    _print({"event": "stopped", **fleet.totals()})
    return 0


def _serve(fleet: Fleet, stopping: threading.Event, duration_s: float, stats_every_s: float) -> None:
    """Until stopped or ``duration_s`` is up; a stats line (with this process's CPU %) now and then."""
    end = time.monotonic() + duration_s if duration_s > 0 else float("inf")
    wall, cpu = time.monotonic(), time.process_time()
    while not stopping.is_set() and time.monotonic() < end:
        stopping.wait(min(stats_every_s, max(0.0, end - time.monotonic())))
        now_wall, now_cpu = time.monotonic(), time.process_time()
        if now_wall - wall >= 0.1:
            totals = fleet.totals()
            cpu_pct = round(100 * (now_cpu - cpu) / (now_wall - wall), 1)
            log.info(
                "simulator_stats",
                cpu_pct=cpu_pct,
                connected=totals["connected"],
                records_sent=totals["records_sent"],
                events_sent=totals["events_sent"],
            )
            _print(
                {
                    "event": "stats",
                    "cpu_pct": cpu_pct,
                    "rss_mb": _rss_mb(),
                    "connected": totals["connected"],
                    "records_sent": totals["records_sent"],
                }
            )
        wall, cpu = now_wall, now_cpu


def _rss_mb() -> float | None:
    """This process's resident memory (Linux), for the stats line."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _on_signals(stopping: threading.Event) -> dict[int, Any]:
    """SIGINT and SIGTERM stop the fleet cleanly; returns the handlers they replaced."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, handler)
    return previous


def _print(doc: dict[str, object]) -> None:
    print(json.dumps(doc, sort_keys=True), flush=True)
