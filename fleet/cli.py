"""``edge-fleet``: the fleet manager's command line: the signed pack repository, devices and the
broker, updates and rollouts, telemetry and its API.

edge-fleet repo init        --repo DIR --keys DIR
edge-fleet pack publish PACK --repo DIR --keys DIR [--min-agent-version V] [--hardware H ...]
edge-fleet timestamp refresh --repo DIR --keys DIR
edge-fleet keys rotate ROLE  --repo DIR --keys DIR   (needs the offline root keys)
edge-fleet serve            --repo DIR [--port 8080]
edge-fleet keys operator NAME --out DIR         (a key that signs instructions)
edge-fleet device provision ID --repo DIR --operator-key PUB --broker URL --passwd FILE --out DIR
edge-fleet device revoke ID --passwd FILE
edge-fleet broker acl --out FILE --operator NAME ... [--fleet NAME] [--ingest NAME]
edge-fleet broker user NAME --passwd FILE
edge-fleet update send --broker URL --device ID --target NAME@VERSION --signing-key KEY
edge-fleet ingest --broker URL --db URL|PATH --group NAME    (telemetry into the store, until SIGTERM)
edge-fleet service --db URL|PATH --broker URL --group NAME --listen HOST:PORT --tokens FILE  (ingest + API)
edge-fleet token add --role read|admin --tokens FILE [--name NAME]   (prints a new API token once)
edge-fleet telemetry prune --db URL|PATH --raw-days 7       (hourly rollups, then raw metrics deleted)
edge-fleet devices [--selector S] | device show ID | metrics --metric M (--device ID | --selector S)
    --api URL --token-file FILE [--json]                    (the API's clients)
edge-fleet rollout start --target NAME@VERSION [--selector S] [--waves 1%,10%,50%,100%] [--canary ID,...]
edge-fleet rollout status [ID] [--watch] | pause ID | resume ID | abort ID | rollback ID
    --api URL --token-file FILE                             (the service drives it: --signing-key)
edge-fleet simulate --devices N --broker URL --operator-key PUB ...   (simulated devices, until SIGTERM)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from agent.logs import configure_logging
from agent.transport import MqttError
from agent.transport.options import add_broker_options, request_client
from fleet.errors import FleetError
from fleet.operators import create_operator_key, signing_key
from fleet.repository import FleetRepository
from fleet.simulator import cli as simulator
from model_packs import instructions
from model_packs.cli_errors import run_command
from model_packs.errors import PackError

if TYPE_CHECKING:
    from fleet.telemetry.ingest import IngestConfig

ROOT_PASSPHRASE_ENV = "EDGE_FLEET_ROOT_PASSPHRASE"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-fleet",
        description=(__doc__ or "").replace("``", ""),  # the overview, without the docstring's markup
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="group", required=True)

    def repo_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--repo", type=Path, required=True)
        sp.add_argument("--keys", type=Path, required=True)

    repo = sub.add_parser("repo", help="the signed (TUF) pack repository: create it").add_subparsers(
        dest="command", required=True
    )
    init = repo.add_parser("init", help="new repository: 2-of-3 root keys, one key per online role")
    repo_args(init)
    init.add_argument("--root-keys", type=int, default=3)
    init.add_argument("--root-threshold", type=int, default=2)
    init.add_argument(
        "--root-keys-dir",
        type=Path,
        help="where the root keys go (default KEYS/root): offline media; encrypted with "
        "$EDGE_FLEET_ROOT_PASSPHRASE, which init requires",
    )
    pack = sub.add_parser("pack", help="sign a built pack into the repository").add_subparsers(
        dest="command", required=True
    )
    pub = pack.add_parser("publish", help="sign a pack as a target")
    repo_args(pub)
    pub.add_argument("pack", type=Path)
    pub.add_argument("--min-agent-version", default="0.1.0")
    pub.add_argument(
        "--hardware",
        action="append",
        default=[],
        help="hardware tag the pack is for (repeatable; default any). A second pack of a published "
        "release at another level becomes its variant for these tags, e.g. aarch64-no-dotprod",
    )
    pub.add_argument(
        "--rollback",
        action="store_true",
        help="sign a lower version as a rollback instruction (devices may then go back to it)",
    )
    ts = sub.add_parser("timestamp", help="re-sign the repository's short-lived timestamp").add_subparsers(
        dest="command", required=True
    )
    repo_args(ts.add_parser("refresh", help="re-sign timestamp.json (run it well within its 1-day expiry)"))
    keys = sub.add_parser(
        "keys", help="the repository's role keys and the operators' signing keys"
    ).add_subparsers(dest="command", required=True)
    rot = keys.add_parser("rotate", help="replace a role's keys (needs the root keys)")
    repo_args(rot)
    rot.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    rot.add_argument("--root-keys-dir", type=Path, help="the offline root keys (default KEYS/root)")
    op = keys.add_parser("operator", help="a new operator key that signs update instructions and commands")
    op.add_argument("name", help="file name stem: NAME.key (private) and NAME.pub (for the devices)")
    op.add_argument("--out", type=Path, required=True)
    srv = sub.add_parser("serve", help="serve the repository over HTTP (Range supported)")
    srv.add_argument("--repo", type=Path, required=True)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080)
    dev = sub.add_parser("device", help="provision, revoke or show one device").add_subparsers(
        dest="command", required=True
    )
    prov = dev.add_parser("provision", help="credentials, trusted root and config for a new device")
    prov.add_argument("device_id")
    prov.add_argument("--repo", type=Path, required=True, help="the fleet repository (its current root)")
    prov.add_argument(
        "--operator-key", type=Path, action="append", default=[], help="public key (repeatable)"
    )
    prov.add_argument("--broker", required=True, help="the broker URL the device connects to")
    prov.add_argument("--passwd", type=Path, required=True, help="the broker's password file")
    prov.add_argument("--out", type=Path, required=True)
    prov.add_argument("--repository-url", help="where the device fetches packs (updates.repository_url)")
    prov.add_argument("--force", action="store_true", help="new credentials for a known or revoked id")
    rev = dev.add_parser("revoke", help="remove a device's broker credentials (then SIGHUP the broker)")
    rev.add_argument("device_id")
    rev.add_argument("--passwd", type=Path, required=True)
    brk = sub.add_parser("broker", help="the broker's ACL file and operator logins").add_subparsers(
        dest="command", required=True
    )
    acl = brk.add_parser("acl", help="the broker ACL file: access by authenticated identity")
    acl.add_argument("--out", type=Path, required=True)
    acl.add_argument("--operator", action="append", default=[], help="operator username (repeatable)")
    acl.add_argument(
        "--ingest", action="append", default=[], help="an ingest-only fleet login: reads, acks (repeatable)"
    )
    acl.add_argument(
        "--fleet",
        action="append",
        default=[],
        help="a fleet service login that also drives rollouts (--signing-key): reads, acks, instructions",
    )
    usr = brk.add_parser("user", help="add an operator's broker login; prints its new password")
    usr.add_argument("name")
    usr.add_argument("--passwd", type=Path, required=True)
    usr.add_argument("--force", action="store_true")
    upd = sub.add_parser("update", help="send a signed update instruction to one device").add_subparsers(
        dest="command", required=True
    )
    send = upd.add_parser("send", help="publish one rollout instruction to a device")
    add_broker_options(send)
    send.add_argument("--device", required=True)
    send.add_argument("--target", required=True)
    send.add_argument(
        "--client", default="fleet", help="client name for the agent's fairness and rate limits"
    )
    send.add_argument(
        "--signing-key",
        type=Path,
        required=True,
        help="operator key that signs the instruction (edge-fleet keys operator; the device must trust it)",
    )
    _ingest_parser(sub)
    _service_parsers(sub, dev)
    _rollout_parsers(sub)
    simulator.register(sub)
    return p


def _rollout_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """edge-fleet rollout ...: the API's rollout routes (fleet/api/rollouts.py)."""
    ro = sub.add_parser(
        "rollout", help="fleet-wide rollouts in health-gated waves, through the fleet API"
    ).add_subparsers(dest="command", required=True)
    start = ro.add_parser("start", help="roll a published pack out in health-gated waves")
    start.add_argument("--target", required=True, help="NAME@VERSION, published with edge-fleet pack publish")
    start.add_argument("--selector", help="which devices (default all): hardware=X,tag=Y,pack=NAME,state=S")
    start.add_argument(
        "--waves", default="1%,10%,50%,100%", help="cumulative: 1%%,10%%,50%%,100%% or 10,100,all"
    )
    start.add_argument("--canary", default="", help="named devices first, as wave 0: ID,ID,...")
    rule_help = {
        "max-failure-rate": "failed or rolled back over a wave's devices that halts it (0.1)",
        "tokens-per-s-drop": "halt when updated devices' tokens/s fall by more than this share (0.2)",
        "ttft-rise": "... or time to first token rises by more than this share (0.5)",
        "error-rate-rise": "... or the error rate rises by more than this (absolute, 0.05)",
        "validation-rise": "... or answers with ungrounded numbers rise by more than this (0.05)",
        "soak": "seconds a settled wave is watched before the next starts (600)",
        "deadline": "seconds offline devices may still get their instruction (7 days)",
    }
    for name, text in rule_help.items():
        start.add_argument(f"--{name}", type=float, help=text)
    status = ro.add_parser("status", help="one rollout (or the recent ones) with per-wave progress")
    status.add_argument("rollout_id", nargs="?")
    status.add_argument("--watch", action="store_true", help="redraw every --every seconds until it ends")
    status.add_argument("--every", type=float, default=2.0)
    for action in ("pause", "resume", "abort", "rollback"):
        ro.add_parser(action, help=f"{action} a rollout").add_argument("rollout_id")
    for cp in ro.choices.values():
        cp.add_argument("--api", default="http://127.0.0.1:8090", help="the service's URL")
        cp.add_argument("--token-file", type=Path, required=True, help="file holding an API token")
        cp.add_argument("--json", action="store_true", help="the API's JSON instead of text")
        cp.add_argument("--api-ca", type=Path, help="CA certificate(s) to verify an https:// API")


def _ingest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ing = sub.add_parser(
        "ingest",
        help="store devices' telemetry, status and update events (one worker; run more with one --group)",
    )
    add_broker_options(ing)
    ing.add_argument(
        "--db",
        default="fleet-telemetry.sqlite3",
        help="an SQLite file (default fleet-telemetry.sqlite3), or postgresql://USER@HOST/DB "
        "(a password from PGPASSWORD or ~/.pgpass keeps it out of ps)",
    )
    ing.add_argument(
        "--group", dest="share_group", metavar="NAME", required=True, help="shared-subscription group"
    )
    ing.add_argument(
        "--client-id",
        help="this worker's broker session (stable across restarts, unique per worker; "
        "default ingest-GROUP-HOSTNAME)",
    )
    ing.add_argument("--topic-prefix", default="edge", help="topics are PREFIX/DEVICE/... (default edge)")
    ing.add_argument("--session-expiry", type=int, default=86_400, help="seconds the broker keeps a session")
    ing.add_argument("--stats-every", type=float, default=60.0, help="seconds between ingest_stats logs")


def _service_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    device: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """The fleet service and the API's clients (fleet/service.py, fleet/api/)."""
    svc = sub.add_parser("service", help="the ingest worker and the HTTP API in one process")
    _ingest_options(svc)
    svc.add_argument(
        "--listen", default="127.0.0.1:8090", help="HOST:PORT for the API (default 127.0.0.1:8090)"
    )
    svc.add_argument("--tokens", type=Path, required=True, help="API token file (edge-fleet token add)")
    svc.add_argument("--api-only", action="store_true", help="no ingest worker: serve the API from the store")
    svc.add_argument(
        "--roll-every",
        type=float,
        default=60.0,
        help="seconds between folds of new metrics into hourly rollups",
    )
    svc.add_argument(
        "--signing-key",
        type=Path,
        help="operator key that signs rollout instructions: with it, this service drives rollouts "
        "(an encrypted key's passphrase from EDGE_FLEET_KEY_PASSPHRASE)",
    )
    svc.add_argument("--driver-tick", type=float, default=1.0, help="seconds between rollout driver passes")
    svc.add_argument(
        "--lease",
        type=float,
        default=15.0,
        help="seconds a rollout driver's lease lasts: how soon another service takes over a dead one's",
    )
    svc.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (chain), PEM")
    svc.add_argument("--tls-key", type=Path, help="the certificate's private key, PEM")
    tok = sub.add_parser("token", help="the fleet API's access tokens").add_subparsers(
        dest="command", required=True
    )
    add = tok.add_parser("add", help="a new API token: its hash goes to the file, the token to stdout")
    add.add_argument("--role", choices=["read", "admin"], required=True)
    add.add_argument("--tokens", type=Path, required=True)
    add.add_argument("--name", default="token", help="a label kept beside the hash")
    tel = sub.add_parser("telemetry", help="the telemetry store's upkeep").add_subparsers(
        dest="command", required=True
    )
    prn = tel.add_parser(
        "prune", help="roll raw metrics older than --raw-days up into hours, then delete them"
    )
    prn.add_argument("--db", default="fleet-telemetry.sqlite3")
    prn.add_argument("--raw-days", type=float, default=7.0)
    prn.add_argument(
        "--rollup-days", type=float, default=400.0, help="hourly rollups kept (default 400 days)"
    )
    clients = [
        sub.add_parser("devices", help="the registry, from the fleet API"),
        device.add_parser(
            "show", help="one device from the fleet API: registry, latest metrics, events, gaps"
        ),
        sub.add_parser("metrics", help="a metric's series, from the fleet API"),
    ]
    for cp in clients:
        cp.add_argument("--api", default="http://127.0.0.1:8090", help="the service's URL")
        cp.add_argument("--token-file", type=Path, required=True, help="file holding an API token")
        cp.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
        cp.add_argument(
            "--api-ca", type=Path, help="CA certificate(s) to verify an https:// API (default: system's)"
        )
    clients[0].add_argument("--selector", help="hardware=X,tag=Y,pack=NAME[@VERSION],state=S")
    clients[1].add_argument("device_id")
    met = sub.choices["metrics"]
    met.add_argument(
        "--metric", required=True, help="dotted path in metrics records, e.g. answers.latency_ms.p95"
    )
    which = met.add_mutually_exclusive_group(required=True)
    which.add_argument("--device")
    which.add_argument("--selector")
    met.add_argument("--since", default="24h")
    met.add_argument("--until")
    met.add_argument("--step")
    met.add_argument("--agg", default="avg", choices=["avg", "max", "min", "sum"])


def _ingest_options(p: argparse.ArgumentParser) -> None:
    """What `edge-fleet ingest` takes, for the service's worker."""
    add_broker_options(p)
    p.add_argument(
        "--db", default="fleet-telemetry.sqlite3", help="an SQLite file or postgresql://USER@HOST/DB"
    )
    p.add_argument(
        "--group", dest="share_group", metavar="NAME", default="fleet", help="shared-subscription group"
    )
    p.add_argument("--client-id", help="this worker's broker session (default service-GROUP-HOSTNAME-PORT)")
    p.add_argument("--topic-prefix", default="edge")
    p.add_argument("--session-expiry", type=int, default=86_400)


def _run(args: argparse.Namespace) -> int:
    if args.group in ("service", "token", "telemetry"):
        return _service_admin(args)
    if args.group in ("devices", "metrics") or (args.group == "device" and args.command == "show"):
        return _api_client(args)
    if args.group == "rollout":
        return _rollout(args)
    if args.group == "simulate":
        return simulator.run(args)
    if args.group == "serve":
        from fleet.serve import make_server

        server = make_server(args.repo, args.host, args.port)
        print(f"serving {args.repo} on http://{args.host}:{args.port}/", flush=True)
        server.serve_forever()
        return 0
    if args.group == "update":
        return _send_update(args)
    if args.group == "ingest":
        return _ingest(args)
    if args.group in ("device", "broker"):
        return _identity(args)
    if args.group == "keys" and args.command == "operator":
        private, public, kid = create_operator_key(args.out, args.name)
        print(json.dumps({"private": str(private), "public": str(public), "key_id": kid}))
        return 0
    secret = os.environ.get(ROOT_PASSPHRASE_ENV)
    if args.group == "repo" and not secret:
        raise FleetError(
            f"root keys are only ever written encrypted: set {ROOT_PASSPHRASE_ENV} "
            "(and keep the passphrase apart from the keys)"
        )
    root_dir = getattr(args, "root_keys_dir", None)
    repo = FleetRepository(
        args.repo, args.keys, root_keys_dir=root_dir, root_passphrase=secret.encode() if secret else None
    )
    if args.group == "repo":
        repo.init(args.root_keys, args.root_threshold)
        where = root_dir or args.keys / "root"
        print(f"repository in {args.repo}; online keys in {args.keys}; root keys (encrypted) in {where}")
        print(f"move {where} to offline media: only `keys rotate` needs it", file=sys.stderr)
    elif args.group == "pack":
        done = repo.publish(args.pack, args.min_agent_version, tuple(args.hardware or ["any"]), args.rollback)
        print(
            json.dumps(
                {
                    "target": done.path,
                    "length": done.length,
                    "sha256": done.sha256,
                    "targets_version": done.version,
                }
            )
        )
    elif args.group == "timestamp":
        print(f"timestamp version {repo.refresh_timestamp()}")
    elif args.group == "keys":
        print(f"{args.role} keys rotated; new key ids: {repo.rotate(args.role)}")
    return 0


def _identity(args: argparse.Namespace) -> int:
    """Device and operator identities on the broker (fleet/devices.py)."""
    import secrets

    from fleet import devices

    if args.group == "device" and args.command == "provision":
        done = devices.provision(
            args.device_id,
            args.out,
            args.repo / "metadata" / "root.json",
            args.operator_key,
            args.broker,
            args.passwd,
            args.repository_url,
            args.force,
        )
        print(
            json.dumps(
                {"device": args.device_id, "directory": str(done.directory), "config": str(done.config)}
            )
        )
    elif args.group == "device":
        had = devices.revoke(args.device_id, args.passwd)
        print(json.dumps({"device": args.device_id, "revoked": True, "had_credentials": had}))
        print(f"send the broker SIGHUP (systemctl reload mosquitto) to apply {args.passwd}", file=sys.stderr)
    elif args.command == "acl":
        devices.write_acl(args.out, args.operator, args.ingest, args.fleet)
        print(
            json.dumps(
                {"acl": str(args.out), "operators": args.operator, "ingest": args.ingest, "fleet": args.fleet}
            )
        )
    else:
        password = secrets.token_urlsafe(24)
        devices.add_user(args.passwd, args.name, password, args.force)
        print(json.dumps({"user": args.name, "password": password}))
    return 0


def _send_update(args: argparse.Namespace) -> int:
    """One rollout instruction, MQTT 5 with the client key as a user property."""
    configure_logging("warning")  # stdout carries the JSON result; connection trouble goes to stderr
    fields = {"v": 1, "id": uuid.uuid4().hex[:16], "rollout_id": uuid.uuid4().hex[:12], "target": args.target}
    envelope = instructions.sign(signing_key(args.signing_key), "update", args.device, fields)
    with request_client(args, args.device, args.client) as client:
        reply = client.request("update", envelope, 30)
    print(json.dumps({**fields, "key": envelope["key"], "reply": reply}))
    return 0 if reply.get("type") == "final" else 1


def _ingest(args: argparse.Namespace) -> int:
    """One telemetry worker (fleet/telemetry/ingest.py) until SIGTERM or SIGINT."""
    import signal
    import socket
    import threading

    from fleet.telemetry.ingest import serve

    configure_logging("info")
    cfg = _ingest_config(args, f"ingest-{args.share_group}-{socket.gethostname()}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(cfg, args.db, stop, args.stats_every)
    return 0


def _ingest_config(args: argparse.Namespace, default_id: str) -> IngestConfig:
    """The worker's broker side from the options `ingest` and `service` share."""
    from fleet.telemetry.ingest import IngestConfig

    return IngestConfig(
        broker_url=args.broker,
        group=args.share_group,
        client_id=args.client_id or default_id[:64],
        username=args.username,
        password=args.password,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        topic_prefix=args.topic_prefix,
        session_expiry_s=args.session_expiry,
    )


def _service_admin(args: argparse.Namespace) -> int:
    """edge-fleet service | token add | telemetry prune."""
    if args.group == "token":
        from fleet.api.auth import add_token

        print(add_token(args.tokens, args.role, args.name))
        return 0
    if args.group == "telemetry":
        from dataclasses import asdict

        from fleet.telemetry.retention import prune
        from fleet.telemetry.store import TelemetryStore

        store = TelemetryStore.open(args.db)
        try:
            print(json.dumps(asdict(prune(store, args.raw_days, args.rollup_days))))
        finally:
            store.close()
        return 0
    return _service(args)


def _service(args: argparse.Namespace) -> int:
    import socket

    from fleet.service import ServiceConfig, parse_listen, run

    configure_logging("info")
    host, port = parse_listen(args.listen)
    ingest = None
    if not args.api_only:
        ingest = _ingest_config(args, f"service-{args.share_group}-{socket.gethostname()}-{port}")
    tls = {"tls_cert": args.tls_cert, "tls_key": args.tls_key}
    where = {"db": args.db, "tokens": args.tokens, "host": host, "port": port}
    driver = {"signing_key": args.signing_key, "driver_tick_s": args.driver_tick, "lease_s": args.lease}
    run(ServiceConfig(**where, ingest=ingest, roll_every_s=args.roll_every, **tls, **driver))
    return 0


def _api_client(args: argparse.Namespace) -> int:
    """edge-fleet devices | device show ID | metrics: a table, or the API's JSON with --json."""
    from urllib.parse import quote

    from fleet.api import client

    api = client.ApiClient(args.api, args.token_file, ca_file=args.api_ca)
    if args.group == "devices":
        found = api.get("/api/v1/devices", selector=args.selector)
        text = client.devices_table(found["devices"])
    elif args.group == "device":
        found = api.get(f"/api/v1/devices/{quote(args.device_id, safe='')}")
        text = client.device_text(found)
    else:
        common = {"metric": args.metric, "since": args.since, "until": args.until, "step": args.step}
        if args.device:
            found = api.get(f"/api/v1/devices/{quote(args.device, safe='')}/series", agg=args.agg, **common)
        else:
            found = api.get("/api/v1/series", selector=args.selector, agg=args.agg, **common)
        text = client.series_table(found)
    print(json.dumps(found, indent=2) if args.json else text)
    return 0


_RULE_OPTIONS = {
    "max_failure_rate": "max_failure_rate",
    "tokens_per_s_drop": "tokens_per_s_drop",
    "ttft_rise": "ttft_rise",
    "error_rate_rise": "error_rate_rise",
    "validation_rise": "validation_rise",
    "soak": "soak_s",
    "deadline": "deadline_s",
}
_ENDED = ("completed", "aborted", "rolled_back")


def _rollout(args: argparse.Namespace) -> int:
    """edge-fleet rollout start | status | pause | resume | abort | rollback."""
    import time

    from fleet.api import client
    from fleet.rollouts.view import rollout_text

    api = client.ApiClient(args.api, args.token_file, ca_file=args.api_ca)
    if args.command == "start":
        rules = {
            key: getattr(args, opt) for opt, key in _RULE_OPTIONS.items() if getattr(args, opt) is not None
        }
        canary = [c for c in args.canary.split(",") if c]
        body = {"target": args.target, "selector": args.selector, "waves": args.waves, "canary": canary}
        found = api.post("/api/v1/rollouts", {**body, "rules": rules})
    elif args.command == "status" and args.rollout_id is None:
        found = api.get("/api/v1/rollouts")
        text = "\n\n".join(rollout_text(r) for r in found["rollouts"]) or "no rollouts"
        print(json.dumps(found, indent=2) if args.json else text)
        return 0
    elif args.command == "status":
        path = f"/api/v1/rollouts/{args.rollout_id}"
        found = api.get(path)
        while args.watch and not args.json and found["state"] not in _ENDED:
            print("\x1b[2J\x1b[H" + rollout_text(found), flush=True)  # clear, home: a live view
            time.sleep(args.every)
            found = api.get(path)
    else:
        found = api.post(f"/api/v1/rollouts/{args.rollout_id}/{args.command}")
    print(json.dumps(found, indent=2) if args.json else rollout_text(found))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(
        "edge-fleet", lambda: _run(args), errors=(FleetError, PackError), unreachable=(MqttError,)
    )


if __name__ == "__main__":
    sys.exit(main())
