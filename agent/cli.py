"""``edge-agent``: run the daemon, ask locally, or query a running agent over MQTT."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.inference import Engine, GenerationRequest, load_pack
from agent.inference.sampling import SamplingParams
from agent.logs import configure_logging
from agent.progress import Progress
from agent.sensors.windows import AGGREGATES, age_text, read_text
from agent.transport import MqttError
from agent.transport.options import add_broker_options, request_client
from model_packs.cli_errors import parse_args, run_command
from model_packs.errors import PackError
from model_packs.format import default_pack_path, read_manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="Run the agent daemon, ask a model pack locally, or query a running agent over MQTT.",
    )
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="default: %(default)s")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ask", help="answer one question locally, streaming")
    a.add_argument("question", help="the question (quote it)")
    a.add_argument("--pack", type=Path, help="pack directory (default: the default pack in the cache)")
    a.add_argument("--max-tokens", type=int, help="tokens to generate at most (default: the pack's)")
    a.add_argument("--temperature", type=float, help="0 is greedy (default: the pack's)")
    a.add_argument("--top-k", type=int, help="default: the pack's")
    a.add_argument("--top-p", type=float, help="default: the pack's")
    a.add_argument("--repetition-penalty", type=float, help="default: the pack's")
    a.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    a.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    a.add_argument("--system", help="system prompt (default: the pack's)")
    a.add_argument("--threads", type=int, help="inference threads (default: the engine's choice)")
    a.add_argument("--context-length", type=int, help="default: the pack's")
    pk = sub.add_parser("pack", help="model packs in the agent's store").add_subparsers(
        dest="pack_cmd", required=True
    )
    inst = pk.add_parser("install", help="sideload a signed pack from a local copy of the fleet repository")
    inst.add_argument("--config", type=Path, required=True, help="the agent's config file")
    inst.add_argument(
        "--from", dest="source", type=Path, required=True, help="repository copy (metadata/, targets/)"
    )
    inst.add_argument("--target", required=True, help="NAME@VERSION")
    pr = pk.add_parser(
        "probe",
        help="load the active pack as the daemon does at start: a pack on trial runs its first "
        "health probe and is confirmed, or rolled back",
    )
    pr.add_argument("--config", type=Path, required=True, help="the agent's config file")
    r = sub.add_parser("run", help="run the MQTT daemon")
    r.add_argument("--config", type=Path, required=True, help="the agent's config file (YAML)")
    for name, helptext in (
        ("query", "ask a running agent a question; the answer streams"),
        ("read", "a sensor's exact reading or aggregate from a running agent (no model)"),
        ("cmd", "send a command to a running agent: ping, status, cancel, reload"),
    ):
        c = sub.add_parser(name, help=helptext)
        add_broker_options(c)
        c.add_argument("--device", required=True, help="the agent's device_id")
        c.add_argument(
            "--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version (default: %(default)s)"
        )
        c.add_argument(
            "--client",
            default="operator",
            help="client name for fairness and rate limits (default: %(default)s)",
        )
        c.add_argument(
            "--timeout",
            type=float,
            default=120.0,
            metavar="SECONDS",
            help="how long to wait for the final reply (default: %(default)g)",
        )
        c.add_argument("--json", action="store_true", help="print the final reply as JSON")
        c.add_argument(
            "--no-status-check",
            action="store_true",
            help="send even when the device's retained status is missing or offline "
            "(for brokers that keep no retained messages)",
        )
    q = sub.choices["query"]
    q.add_argument("question", help="the question (quote it)")
    q.add_argument("--max-tokens", type=int, help="default: the agent's prompt.max_tokens")
    q.add_argument("--temperature", type=float, help="0 is greedy (default: the agent's prompt.temperature)")
    q.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    rd = sub.choices["read"]
    rd.add_argument("--sensor", required=True, help="sensor name or alias, as in the agent's config")
    rd.add_argument(
        "--window",
        default=None,
        metavar="DURATION",
        help="how far back to aggregate: seconds or a number with ms, s, m, h or d (30s, 5m, 1h); "
        "default: the sensor's window_s",
    )
    rd.add_argument(
        "--agg",
        default="last",
        choices=AGGREGATES,
        help="last reading, or mean, min, max, count over the window, or trend (change per minute); "
        "default: %(default)s",
    )
    cm = sub.choices["cmd"]
    cm.add_argument("name", choices=["ping", "status", "cancel", "reload"], help="the command")
    cm.add_argument("--target-id", help="cancel: the id of the request to cancel")
    cm.add_argument(
        "--signing-key",
        type=Path,
        help="operator key that signs a reload (the device must trust it; "
        "passphrase in $EDGE_FLEET_KEY_PASSPHRASE when encrypted)",
    )
    return p


LOG_LEVELS = ("debug", "info", "warning", "error")


def _pick(value: float | int | None, default: float | int) -> float | int:
    return default if value is None else value


def _ask(args: argparse.Namespace) -> int:
    path = args.pack or default_pack_path()
    if args.pack is None and not path.exists():
        print(f"edge-agent: no default pack at {path}; build it with: edge-pack build", file=sys.stderr)
        return 2
    pack = load_pack(path)
    gen = pack.manifest.generation
    engine = Engine(pack, threads=args.threads, context_length=args.context_length)
    sampling = SamplingParams(
        temperature=float(_pick(args.temperature, gen.temperature)),
        top_k=int(_pick(args.top_k, gen.top_k)),
        top_p=float(_pick(args.top_p, gen.top_p)),
        repetition_penalty=float(_pick(args.repetition_penalty, gen.repetition_penalty)),
        seed=args.seed,
    )
    prompt = engine.prompt_ids(args.question, args.system)
    req = GenerationRequest(prompt, int(_pick(args.max_tokens, gen.max_tokens)), sampling, tuple(args.stop))

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    done = engine.generate(req, on_delta=show)
    u = done.usage
    print(
        f"\n\n[{pack.manifest.name} {pack.manifest.version}] prompt {u.prompt_tokens} tokens, "
        f"completion {u.completion_tokens} tokens ({done.finish_reason}), "
        f"time to first token {u.time_to_first_token_s * 1000:.0f} ms, "
        f"decode {u.decode_tokens_per_s:.1f} tokens/s, {engine.threads} threads",
        file=sys.stderr,
    )
    return 0


def _pack_probe(args: argparse.Namespace) -> int:
    """The daemon's start-up without MQTT: exit 0 when the active pack serves (a trial pack
    passed its first probe and is confirmed), 1 when it had to roll back or nothing loads."""
    from agent.config import load_config
    from agent.packs.active import ActivePack, engine_factory
    from agent.packs.health import HealthBudget
    from agent.packs.store import PackStore

    cfg = load_config(args.config)
    store = PackStore(Path(cfg.state_dir))
    store.converge()
    was = store.state()
    active = ActivePack(
        store,
        engine_factory(cfg.pack),
        cfg.pack.path,
        cfg.updates.ram_budget_mb,
        HealthBudget(latency_factor=cfg.updates.latency_factor),
    )
    active.boot()
    now = store.state()
    serving = active.label()
    if active.error is not None and active.info() is None:
        print(f"not serving: {active.error}", file=sys.stderr)
        return 1
    if was.trial and not now.trial and now.active == was.active:
        print(f"confirmed: {serving} passed its first health probe")
        return 0
    if was.trial:
        print(f"rolled back to {serving}: {active.error}", file=sys.stderr)
        return 1
    print(f"serving: {serving}")
    return 0


def _pack_install(args: argparse.Namespace) -> int:
    """Sideload: the same TUF verification, health gate and A/B switch as a network update."""
    from agent import __version__
    from agent.config import load_config
    from agent.packs.store import PackStore
    from agent.packs.updater import UpdateEvent, offline_updater, provision_trust

    cfg = load_config(args.config)
    state = Path(cfg.state_dir)
    if cfg.updates.trusted_root:
        provision_trust(state / "tuf", Path(cfg.updates.trusted_root))

    def show(e: UpdateEvent) -> None:
        pct = f" {e.percent:.0f}%" if e.percent is not None else ""
        why = f" [{e.reason_code}] {e.reason}" if e.reason_code else ""
        print(f"{e.state}{pct}{why}", file=sys.stderr)

    store = PackStore(state)
    store.converge()
    updater = offline_updater(
        store,
        state / "tuf",
        args.source.resolve().as_uri(),
        __version__,
        hardware=cfg.updates.hardware,
        variants=cfg.updates.variants,
        on_event=show,
        sideload=True,
        threads=cfg.pack.threads,
    )
    path = updater.install(args.target)
    variant = read_manifest(path).variant
    print(
        f"active: {args.target} (variant {variant}) in {path}; "
        "restart the agent or send `cmd reload` to serve it"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    import signal

    from agent.app import Agent
    from agent.config import load_config

    cfg = load_config(args.config)
    configure_logging(cfg.log_level)
    agent = Agent(cfg, config_path=args.config)
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGHUP, lambda *_: agent.reload_in_background())  # systemctl reload
    try:
        agent.run()
    finally:
        agent.stop()
    return 0


def _remote(args: argparse.Namespace) -> int:
    import json

    if args.command == "query":
        body: dict[str, object] = {"question": args.question, "stream": True}
        for key in ("max_tokens", "temperature", "seed"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
    elif args.command == "read":
        body = {"sensor": args.sensor, "agg": args.agg, **({"window": args.window} if args.window else {})}
    else:
        body = {"cmd": args.name, **({"target_id": args.target_id} if args.target_id else {})}
        if args.name == "reload":
            body = _signed_reload(args, body)
    watch = not args.no_status_check
    with request_client(args, args.device, args.client, args.protocol, watch_status=watch) as client:
        if watch:
            _check_device(client.device_status(STATUS_WAIT_S), args.device, args.broker)
        streamed = args.command == "query" and not args.json
        progress = Progress(args.device, sys.stderr, enabled=sys.stderr.isatty())

        def on_chunk(chunk: dict[str, object]) -> None:
            progress.chunk(text_shown=streamed and sys.stdout.isatty())
            if streamed:
                _print_chunk(chunk)

        started = time.monotonic()  # the round trip: from publish to the final reply
        with progress:
            reply = client.request(args.command, body, args.timeout, on_chunk=on_chunk)
    elapsed_ms = (time.monotonic() - started) * 1000
    if args.json:
        print(json.dumps(reply, ensure_ascii=False))
    else:
        _show(args.command, reply, elapsed_ms)
    return 0 if reply.get("type") == "final" else 1


STATUS_WAIT_S = 1.0
"""How long to wait for a device's retained status: a broker sends it right after the SUBACK
the client already waited for, so this only bounds the answer for a device it never saw."""


def _check_device(status: dict[str, Any] | None, device: str, broker: str) -> None:
    """Refuse at once what would otherwise wait out ``--timeout``: a device the broker has no
    status for (never connected there: misspelt, or another broker), or one whose last status
    is ``offline`` (a clean stop, or its last will when the connection was lost)."""
    if status is None:
        raise MqttError(
            f"no device {device!r} on {broker}: it has never published a status there (misspelt? "
            "another --broker? or a broker ACL that hides edge/+/status from this login: then "
            "--no-status-check sends anyway)",
            "unknown_device",
        )
    if status.get("state") == "offline":
        raise MqttError(
            f"device {device!r} is offline{_since(status.get('ts'))}: nothing would answer", "device_offline"
        )


def _since(ts: object) -> str:
    """When the offline document was made. A clean stop writes it as the agent stops; a last
    will was written when the agent last connected, so it is the latest time known alive."""
    import datetime

    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return ""
    when = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return f" (its last status, from {when:%Y-%m-%d %H:%M:%S} UTC, {age_text(time.time() - ts)} ago)"


def _signed_reload(args: argparse.Namespace, body: dict[str, object]) -> dict[str, object]:
    """A reload is privileged: signed by an operator key for this device (agent/authority.py)."""
    import uuid

    from model_packs import instructions

    if args.signing_key is None:
        raise AgentError("cmd reload needs --signing-key (an operator key the device trusts)")
    try:
        key = instructions.load_signing_key(args.signing_key)
    except ValueError as exc:
        raise AgentError(f"cannot use signing key {args.signing_key}: {exc}") from None
    fields = {**body, "v": 1, "id": uuid.uuid4().hex[:16]}
    return {**instructions.sign(key, "reload", args.device, fields), "cmd": "reload"}


def _print_chunk(chunk: dict[str, object]) -> None:
    sys.stdout.write(str(chunk.get("delta", "")))
    sys.stdout.flush()


def _show(kind: str, reply: dict[str, object], elapsed_ms: float) -> None:
    import json

    if reply.get("type") == "error":
        print(f"error [{reply.get('code')}]: {reply.get('message')}", file=sys.stderr)
        return
    if kind == "query":
        usage = reply.get("usage") or {}
        if reply.get("first_checks") is not None or reply.get("source") == "escalated":
            # the streamed first try was replaced: the answer is the final text, say why
            why = reply.get("first_checks") or "a larger model answered (routing)"
            print(f"\n[first try not used: {json.dumps(why)}]")
            print(f"{reply.get('text')}")
        checks = reply.get("checks")
        statuses = list(checks.values()) if isinstance(checks, dict) else []
        passed = "checked" if all(v in ("passed", "skipped") for v in statuses) else f"CHECKS: {checks}"
        facts = json.dumps(reply.get("facts"), ensure_ascii=False)
        print(f"\n[{passed}; source {reply.get('source')}; facts: {facts}]")
        print(f"[usage: {json.dumps(usage)}; round trip {elapsed_ms:.0f} ms]")
    elif kind == "read":
        read = reply.get("facts")
        fact = read[0] if isinstance(read, list) and read and isinstance(read[0], dict) else None
        shown = read_text(fact) if fact is not None else str(reply.get("text"))  # an agent without facts
        print(f"{shown}   [round trip {elapsed_ms:.1f} ms]")
    else:
        print(json.dumps(reply.get("result"), indent=2, ensure_ascii=False))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(_parser(), argv)
    configure_logging(args.log_level)
    return run_command(
        "edge-agent", lambda: _dispatch(args), errors=(AgentError, PackError), unreachable=(MqttError,)
    )


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command in ("query", "read", "cmd"):
        return _remote(args)
    if args.command == "pack":
        return _pack_probe(args) if args.pack_cmd == "probe" else _pack_install(args)
    return _ask(args)


if __name__ == "__main__":
    sys.exit(main())
