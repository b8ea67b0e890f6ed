"""Escalation to a larger model: an OpenAI-compatible chat-completions client (issue 12).

The upstream is a site gateway (llama.cpp server, Ollama, vLLM) or a cloud API, reached with
``POST {url}/v1/chat/completions`` (``{url}/chat/completions`` when ``url`` already ends in
``/v1``), no streaming, stdlib only (http.client + ssl): the device install stays small.

What leaves the device obeys ``privacy`` exactly, and only :func:`build_messages` builds it:

    none                nothing: every call fails with ``disabled`` before any socket is opened
    facts               the facts block and the computed verdicts; the operator's question is not
                        sent (the request says it was withheld)
    facts_and_question  the facts block, the verdicts and the question

A call never blocks past its deadline (the request's, or ``now + timeout_s`` if sooner): the
exchange runs on a worker thread that the caller waits for only until then, every socket
operation of the worker has the time left as its timeout, and an abandoned exchange has its
socket shut down. Name resolution cannot be interrupted, so a worker stuck there outlives the
call; at most ``MAX_STRAGGLERS`` such workers may exist, then calls fail ``offline`` at once.

Failures raise :class:`EscalationFailed` with a stable ``reason``:

    disabled      privacy is ``none``, or privacy ``facts`` and no facts to send (or a facts block
                  that holds the question itself: the whole local prompt passed as facts)
    offline       the upstream could not be reached or the connection was lost: refused,
                  unreachable, name not resolved, reset, or closed before the whole answer came
    timeout       the deadline passed before the whole answer came
    tls           the TLS handshake failed: a certificate that ``ca_file`` (or, without it, the
                  system store) does not trust, a name mismatch, no common protocol. Kept apart
                  from ``offline``: it is a configuration fault, not an outage
    http_error    a status other than 200 (``status`` set; no redirect is followed, so a key
                  never goes to another host); at most 200 characters of the body are kept in the
                  message, the API key redacted from them
    bad_response  a 200 whose body is not the OpenAI shape: over 256 KiB, not UTF-8 JSON, nested
                  deeper than 32, no ``choices[0].message.content`` string, or an empty text

The API key goes only into the ``Authorization: Bearer`` header: it is not in any repr, log
event or error message.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger("edge_agent.escalation")

Privacy = Literal["none", "facts", "facts_and_question"]
PRIVACY_LEVELS: tuple[Privacy, ...] = ("none", "facts", "facts_and_question")
Reason = Literal["disabled", "offline", "timeout", "tls", "http_error", "bad_response"]
REASONS: tuple[Reason, ...] = ("disabled", "offline", "timeout", "tls", "http_error", "bad_response")

MAX_RESPONSE_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32
MAX_ERROR_BODY_CHARS = 200
MAX_STRAGGLERS = 4  # abandoned workers (stuck in name resolution) before calls fail at once
_READ_CHUNK = 16 * 1024

SYSTEM_PROMPT = (
    "You answer an operator's question about the sensors of a device. The facts are measured "
    "readings and the verdicts are computed by rules: take both as true, quote figures exactly "
    "as given, and never invent a reading. Answer in one to three short sentences; a yes/no "
    "question gets Yes or No first."
)
QUESTION_WITHHELD = (
    "The operator's question is withheld by the device's privacy rule. State the readings and "
    "the verdicts above plainly, in one to three short sentences."
)


class EscalationFailed(Exception):
    """An escalation that gave no answer; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: Reason, detail: str, status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail
        self.status = status


# ---------------------------------------------------------------- configuration


def _duration(value: object, key: str) -> float:
    """Seconds from a number or a string such as ``"8s"``, ``"1500ms"``, ``"1m"``."""
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", value)):
        seconds = float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m[2]]
    else:
        raise ValueError(f"{key}: expected a duration such as 8, '8s' or '1500ms', got {value!r}")
    if not (math.isfinite(seconds) and 0 < seconds <= 600):
        raise ValueError(f"{key}: must be more than 0 and at most 600 seconds, got {value!r}")
    return seconds


def _text(data: Mapping[str, Any], key: str, path: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}.{key}: expected a non-empty string")
    return value.strip()


def _int(data: Mapping[str, Any], key: str, path: str, default: int, lo: int, hi: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{path}.{key}: expected an integer within {lo}..{hi}, got {value!r}")
    return value


def _check_url(url: str, path: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{path}.url: {url[:120]!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{path}.url: {url[:120]!r} must be http://HOST[:PORT][/PATH] or https://...")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{path}.url: credentials in the URL would be logged; use api_key or api_key_file")
    if parts.query or parts.fragment:
        raise ValueError(f"{path}.url: a base URL has no query or fragment, got {url[:120]!r}")
    if port == 0:
        raise ValueError(f"{path}.url: port 0 in {url[:120]!r}")


@dataclass(frozen=True)
class EscalationConfig:
    """The ``escalation:`` section. ``api_key`` never appears in a repr."""

    url: str
    model: str
    privacy: Privacy
    api_key: str | None = field(default=None, repr=False)
    api_key_file: Path | None = None  # where api_key was read from, if it was
    timeout_s: float = 8.0
    max_tokens: int = 256
    temperature: float = 0.0
    ca_file: Path | None = None  # a private CA: then only it is trusted, not the system store

    @property
    def enabled(self) -> bool:
        return self.privacy != "none"

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], path: str = "escalation") -> EscalationConfig:
        """Validate the section; a ValueError names the key (``escalation.url: ...``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(str(k) for k in set(data) - set(known))
        if unknown:
            raise ValueError(f"{path}.{unknown[0]}: unknown key (known: {', '.join(known)})")
        url, model = _text(data, "url", path), _text(data, "model", path)
        if url is None:
            raise ValueError(f"{path}.url: required key is missing")
        if model is None:
            raise ValueError(f"{path}.model: required key is missing")
        _check_url(url, path)
        privacy = data.get("privacy")
        if privacy is None:
            raise ValueError(
                f"{path}.privacy: required: say what may leave the device (none, facts, facts_and_question)"
            )
        if privacy not in PRIVACY_LEVELS:
            raise ValueError(f"{path}.privacy: {privacy!r} must be none, facts or facts_and_question")
        api_key, key_file = _text(data, "api_key", path), _text(data, "api_key_file", path)
        if api_key is not None and key_file is not None:
            raise ValueError(f"{path}.api_key_file: give api_key or api_key_file, not both")
        if key_file is not None:
            try:
                api_key = Path(key_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}.api_key_file: cannot read {key_file!r}: {exc}") from None
            if not api_key:
                raise ValueError(f"{path}.api_key_file: {key_file!r} is empty")
        if api_key is not None and not re.fullmatch(r"[\x21-\x7e]{1,4096}", api_key):
            raise ValueError(f"{path}.api_key: must be printable ASCII without spaces (a header value)")
        temperature = data.get("temperature", 0.0)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not (0.0 <= temperature <= 2.0)
        ):
            raise ValueError(f"{path}.temperature: expected a number within 0..2, got {temperature!r}")
        ca_file = _text(data, "ca_file", path)
        if ca_file is not None:
            if url.startswith("http://"):
                raise ValueError(f"{path}.ca_file: set for an http:// url; use https:// to use it")
            try:
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"{path}.ca_file: cannot load {ca_file!r} as PEM certificates: {exc}"
                ) from None
        return cls(
            url=url,
            model=model,
            privacy=cast(Privacy, privacy),
            api_key=api_key,
            api_key_file=None if key_file is None else Path(key_file),
            timeout_s=_duration(data.get("timeout_s", 8.0), f"{path}.timeout_s"),
            max_tokens=_int(data, "max_tokens", path, 256, 1, 8192),
            temperature=float(temperature),
            ca_file=None if ca_file is None else Path(ca_file),
        )


# ---------------------------------------------------------------- what is sent


@dataclass(frozen=True)
class EscalationPrompt:
    """What an escalation may carry; :func:`build_messages` decides what of it is sent."""

    facts: str  # the facts block, as the local prompt gives it
    verdicts: tuple[str, ...] = ()  # the computed verdicts, one line each
    question: str = ""


def build_messages(prompt: EscalationPrompt, privacy: Privacy) -> list[dict[str, str]]:
    """The chat messages for ``privacy``: the only place request content is built."""
    if privacy == "none":
        raise EscalationFailed("disabled", "privacy is none: nothing may leave the device")
    facts = prompt.facts.strip()
    verdicts = [v.strip() for v in prompt.verdicts if v.strip()]
    if privacy == "facts" and not facts and not verdicts:
        raise EscalationFailed("disabled", "privacy is facts and there are no facts to send")
    question = prompt.question.strip()
    if privacy == "facts" and len(question) >= 12 and question in "\n".join([facts, *verdicts]):
        # a caller that passed the whole local prompt (facts and question) as the facts block
        raise EscalationFailed("disabled", "privacy is facts and the facts block holds the question")
    parts = [f"Facts:\n{facts or '(no sensor readings)'}"]
    if verdicts:
        parts.append("Verdicts:\n" + "\n".join(f"- {v}" for v in verdicts))
    parts.append(f"Question: {question}" if privacy == "facts_and_question" else QUESTION_WITHHELD)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


def request_body(config: EscalationConfig, messages: list[dict[str, str]]) -> bytes:
    """The exact bytes POSTed (UTF-8 JSON, no ASCII escaping, compact)."""
    doc = {
        "model": config.model,
        "messages": messages,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------- what comes back


@dataclass(frozen=True)
class EscalationResult:
    text: str
    usage: dict[str, int]  # the upstream's integer usage fields (prompt/completion/total_tokens)
    latency_s: float  # from the call to the parsed answer
    model: str  # as the upstream names it, else the configured one
    finish_reason: str | None


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def _depth(body: bytes) -> int:
    """The deepest array/object nesting of a JSON text (brackets inside strings ignored)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', body)):
        depth += 1 if m[0] in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_response(body: bytes, model: str) -> tuple[str, dict[str, int], str, str | None]:
    """(text, usage, model, finish_reason) from an OpenAI chat-completion body."""
    if len(body) > MAX_RESPONSE_BYTES:
        raise EscalationFailed("bad_response", f"body over {MAX_RESPONSE_BYTES} bytes")
    if _depth(body) > MAX_JSON_DEPTH:
        raise EscalationFailed("bad_response", f"JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EscalationFailed("bad_response", "body is not UTF-8 JSON") from None
    try:
        choice = doc["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EscalationFailed("bad_response", "no choices[0].message.content") from None
    if not isinstance(text, str):
        raise EscalationFailed("bad_response", "choices[0].message.content is not a string")
    if not text.strip():
        raise EscalationFailed("bad_response", "the answer is empty")
    raw_usage = doc.get("usage") if isinstance(doc, dict) else None
    usage = {
        k: v
        for k, v in (raw_usage.items() if isinstance(raw_usage, dict) else ())
        if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
    }
    named = doc.get("model")
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return (
        text.strip(),
        usage,
        named if isinstance(named, str) and named else model,
        finish if isinstance(finish, str) else None,
    )


# ---------------------------------------------------------------- the client


def _classify(exc: BaseException) -> EscalationFailed:
    """A transport exception as a failure reason (never with the request or the key)."""
    if isinstance(exc, EscalationFailed):
        return exc
    name = type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return EscalationFailed("tls", f"certificate not trusted: {exc.verify_message}")
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return EscalationFailed("timeout", "the deadline passed waiting for the upstream")
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return EscalationFailed("tls", f"TLS failed: {exc.reason or name}")
    if isinstance(exc, socket.gaierror):
        return EscalationFailed("offline", "the upstream's name did not resolve")
    if isinstance(exc, http.client.IncompleteRead):
        return EscalationFailed("offline", "the connection closed before the whole answer came")
    if isinstance(exc, http.client.RemoteDisconnected):
        return EscalationFailed("offline", "the upstream closed the connection without an answer")
    if isinstance(exc, http.client.HTTPException):  # a status line or headers that are not HTTP
        return EscalationFailed("bad_response", f"not an HTTP response ({name})")
    if isinstance(exc, OSError):  # refused, reset, unreachable, shut down by the deadline
        return EscalationFailed("offline", f"connection failed ({exc.strerror or name})")
    return EscalationFailed("offline", f"connection failed ({name})")


def _printable(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]+", " ", text).strip()


# Abandoned exchanges whose thread has not ended yet, at most MAX_STRAGGLERS.
_stragglers = threading.BoundedSemaphore(MAX_STRAGGLERS)


def _stragglers_full() -> bool:
    if _stragglers.acquire(blocking=False):
        _stragglers.release()
        return False
    return True


class _Exchange:
    """One POST on a worker thread; the caller may abort it (shut its socket down)."""

    def __init__(self, conn: http.client.HTTPConnection, clock: Callable[[], float], stop_at: float) -> None:
        self.conn, self.clock, self.stop_at = conn, clock, stop_at
        self.done = threading.Event()
        self.result: tuple[int, bytes] | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._aborted = self._finished = self._counted = False

    def _left(self) -> float:
        left = self.stop_at - self.clock()
        if left <= 0:
            raise TimeoutError("deadline")
        return left

    def _arm(self) -> None:
        """The socket's timeout becomes the time left (each recv/send waits at most that)."""
        left = self._left()
        with self._lock:
            if self._aborted:
                raise TimeoutError("aborted")
            if self.conn.sock is not None:
                self.conn.sock.settimeout(left)

    def run(self, path: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            self.conn.timeout = self._left()
            self.conn.connect()
            self._arm()
            self.conn.request("POST", path, body=body, headers=headers)
            self._arm()
            resp = self.conn.getresponse()
            length = resp.getheader("content-length")
            if resp.status == 200 and length and length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
                raise EscalationFailed("bad_response", f"body of {length} bytes, over {MAX_RESPONSE_BYTES}")
            limit = MAX_RESPONSE_BYTES if resp.status == 200 else 4096
            chunks, size = [], 0
            while size <= limit:
                self._arm()
                chunk = resp.read(_READ_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size <= limit and resp.length:  # read(amt) returns short at EOF, never raises
                raise http.client.IncompleteRead(b"", resp.length)
            if resp.status == 200 and size > MAX_RESPONSE_BYTES:
                raise EscalationFailed("bad_response", f"body over {MAX_RESPONSE_BYTES} bytes")
            self.result = (resp.status, b"".join(chunks))
        except BaseException as exc:  # reported to the caller, who may have gone already
            self.error = exc
        finally:
            with self._lock:  # not while abort() shuts the socket down
                self.conn.close()
                self._finished = True
                if self._counted:
                    _stragglers.release()
            self.done.set()

    def abort(self) -> None:
        """Give the exchange up: shut its socket down; until its thread ends it counts as a
        straggler (a shut-down socket ends it at once, name resolution when the resolver
        gives up)."""
        with self._lock:
            if self._finished:
                return
            self._aborted = True
            self._counted = _stragglers.acquire(blocking=False)
            if self.conn.sock is not None:
                with contextlib.suppress(OSError):
                    self.conn.sock.shutdown(socket.SHUT_RDWR)


class Escalator:
    """Sends one escalation at a time per call; thread-safe (no shared connection)."""

    def __init__(self, config: EscalationConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        parts = urlsplit(config.endpoint)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._path = parts.path
        self._ssl: ssl.SSLContext | None = None
        if self._tls:
            ca = None if config.ca_file is None else str(config.ca_file)
            self._ssl = ssl.create_default_context(cafile=ca)
        if config.api_key and not self._tls and self._host not in ("localhost", "127.0.0.1", "::1"):
            log.warning("escalation_key_in_clear", host=self._host, hint="use https:// to protect the key")

    def _headers(self) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "edge-slm-agent",
            "Connection": "close",
        }
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._tls:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def complete(self, prompt: EscalationPrompt, deadline: float) -> EscalationResult:
        """Ask the upstream; returns by ``deadline`` (``time.monotonic()``) at the latest, with
        an answer or :class:`EscalationFailed`."""
        started = self._clock()
        try:
            result = self._complete(prompt, deadline, started)
        except EscalationFailed as failed:
            log.info(
                "escalation_failed",
                reason=failed.reason,
                status=failed.status,
                detail=failed.detail,
                host=self._host,
                ms=round((self._clock() - started) * 1000, 1),
            )
            raise
        log.info(
            "escalation_done",
            host=self._host,
            model=result.model,
            ms=round(result.latency_s * 1000, 1),
            completion_tokens=result.usage.get("completion_tokens"),
        )
        return result

    def _complete(self, prompt: EscalationPrompt, deadline: float, started: float) -> EscalationResult:
        messages = build_messages(prompt, self.config.privacy)  # raises disabled for privacy none
        body = request_body(self.config, messages)
        stop_at = min(deadline, started + self.config.timeout_s)
        if stop_at - started <= 0:
            raise EscalationFailed("timeout", "no time left before the deadline")
        if _stragglers_full():
            raise EscalationFailed("offline", f"{MAX_STRAGGLERS} earlier calls still wait on the upstream")
        exchange = _Exchange(self._connection(stop_at - started), self._clock, stop_at)
        worker = threading.Thread(
            target=exchange.run, args=(self._path, body, self._headers()), name="escalation", daemon=True
        )
        worker.start()
        if not exchange.done.wait(max(0.0, stop_at - self._clock())):
            exchange.abort()
            raise EscalationFailed("timeout", f"no answer within {stop_at - started:.2f}s")
        if exchange.error is not None:
            raise _classify(exchange.error)
        assert exchange.result is not None
        status, raw = exchange.result
        if status != 200:
            snippet = raw[:1024].decode("utf-8", "replace")
            if self.config.api_key:
                snippet = snippet.replace(self.config.api_key, "***")
            snippet = _printable(snippet)[:MAX_ERROR_BODY_CHARS]
            raise EscalationFailed("http_error", f"HTTP {status}: {snippet}", status=status)
        text, usage, model, finish = parse_response(raw, self.config.model)
        return EscalationResult(text, usage, self._clock() - started, model, finish)
