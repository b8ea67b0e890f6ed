"""The broker options of the operator-side command lines, defined once.

``edge-agent query|read|cmd`` and ``edge-fleet update send`` reach a broker the way the
daemon does (``mqtt.*`` in its config): plain or TLS, anonymous or with a username and
password, with or without a client certificate. The password comes from a file, never
from the command line, where ``ps`` and shell history would show it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agent.transport.client import RequestClient
from model_packs.cli_errors import EXIT_ERROR, error_line

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def add_broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        default=DEFAULT_BROKER,
        action=_BrokerAction,
        metavar="URL",
        help="HOST:PORT or mqtt://HOST[:PORT] (default port 1883), or mqtts://HOST[:PORT] for TLS "
        "(default port 8883); default: %(default)s",
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


def request_client(
    args: argparse.Namespace, device: str, client: str, protocol: str = "5", *, watch_status: bool = False
) -> RequestClient:
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
        watch_status=watch_status,
    )


class BrokerAddressError(ValueError):
    """A ``--broker`` value that names no broker. Its ``code`` is the command line's, never
    on the wire (so not among docs/protocol.md's error codes)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "bad_broker"


def broker_url(value: str) -> str:
    """``--broker`` as a URL: ``HOST:PORT`` becomes ``mqtt://HOST:PORT``; ``mqtt://`` and
    ``mqtts://`` URLs pass as they are. Anything else is refused, never guessed at: a value
    taken for something it is not would quietly reach the wrong broker (or the default one)."""
    text = value.strip()
    if "://" not in text:
        text = f"mqtt://{text}"
        if not _has_port(text):
            raise BrokerAddressError(f"--broker {value!r}: {_EXPECTED} (a bare host needs mqtt://)")
    parsed = urlparse(text)
    if parsed.scheme not in ("mqtt", "mqtts"):
        raise BrokerAddressError(f"--broker {value!r}: scheme {parsed.scheme!r} is not MQTT: {_EXPECTED}")
    if parsed.username is not None or parsed.password is not None:
        raise BrokerAddressError(
            f"--broker {value!r}: no credentials in the URL, use --username and --password-file"
        )
    if not parsed.hostname or parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise BrokerAddressError(f"--broker {value!r}: {_EXPECTED}")
    _has_port(text)  # an out-of-range or non-numeric port raises
    return text


_EXPECTED = "expected HOST:PORT, mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"


def _has_port(url: str) -> bool:
    try:
        port = urlparse(url).port
    except ValueError:  # urllib: "Port out of range 0-65535", "Port could not be cast to integer"
        port = 0
    if port == 0:
        raise BrokerAddressError(f"--broker {url.split('://', 1)[1]!r}: the port must be 1-65535")
    return port is not None


class _BrokerAction(argparse.Action):
    """Checks ``--broker`` and, when it is bad, ends as every error of these CLIs does:
    ``prog: error [bad_broker]: message`` and exit status 2 (argparse's own usage error
    would carry no code)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        try:
            setattr(namespace, self.dest, broker_url(str(values)))
        except BrokerAddressError as exc:
            parser.exit(EXIT_ERROR, error_line(parser.prog.split()[0], exc) + "\n")


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
