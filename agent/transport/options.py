"""The broker options of the operator-side command lines, defined once.

``edge-agent query|read|cmd`` and ``edge-fleet update send`` reach a broker the way the
daemon does (``mqtt.*`` in its config): plain or TLS, anonymous or with a username and
password, with or without a client certificate. The password comes from a file, never
from the command line, where ``ps`` and shell history would show it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlparse

from agent.transport.client import RequestClient


def add_broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        type=_broker_url,
        help="mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS (default port 8883)",
    )
    p.add_argument("--username", help="broker username")
    p.add_argument(
        "--password-file",
        dest="password",
        type=_password_from,
        metavar="FILE",
        help="file holding the broker password (its first line)",
    )
    p.add_argument("--ca-file", type=_existing, help="CA certificate(s) to verify the broker; turns TLS on")
    p.add_argument("--cert-file", type=_existing, help="client certificate, for brokers that require one")
    p.add_argument("--key-file", type=_existing, help="the client certificate's private key")


def request_client(args: argparse.Namespace, device: str, client: str, protocol: str = "5") -> RequestClient:
    """A :class:`RequestClient` to ``device`` through the broker the options name."""
    return RequestClient(
        args.broker,
        device,
        protocol=protocol,
        client=client,
        username=args.username,
        password=args.password,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )


def _broker_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise argparse.ArgumentTypeError(f"{value!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    return value


def _existing(value: str) -> str:
    """Checked here so a typo is a usage error, not an SSL error from deep inside paho."""
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return value


def _password_from(value: str) -> str:
    try:
        lines = Path(value).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None
    return lines[0] if lines else ""
