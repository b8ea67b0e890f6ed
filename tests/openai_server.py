"""A real OpenAI chat-completions server around the project's own engine, with fault modes.

``POST /v1/chat/completions`` renders the messages with the engine's chat template
(``Engine.prompt_ids``: the system message and the last user message), generates greedily
and answers in the OpenAI shape. A test switches ``mode`` at any time:

    ok          answer
    slow        sleep ``delay_s`` (interrupted by close()), then answer
    hang        read the request and never answer (until close())
    cut         send the status, the headers (full Content-Length) and half the body, then close
    cut_early   read the request and close without a byte
    drip        send the headers, then the body one byte every ``drip_s`` (each recv is quick)
    error       HTTP 500 whose body echoes the Authorization header and runs past 200 chars
    garbage     200 with a body that is not JSON
    shape       200 with JSON that is not the OpenAI shape
    empty       200 in the OpenAI shape with an empty content
    deep        200 with JSON nested 100 deep
    big         200 with a 300 KiB JSON body and no Content-Length (read until close)

Every request is recorded (path, headers, exact body bytes) in ``requests``. With ``tls``
(certificate, key) the server speaks HTTPS; handshakes that fail are counted in
``tls_failures``. The tiny pack's context is short: a prompt that does not fit is cut from
the left (the end, with the generation prompt, is kept).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from agent.inference import Engine, GenerationRequest, LoadedPack

MODES = (
    "ok",
    "slow",
    "hang",
    "cut",
    "cut_early",
    "drip",
    "error",
    "garbage",
    "shape",
    "empty",
    "deep",
    "big",
)


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: OpenAIServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        ctx = self.owner.ssl_context
        if ctx is not None:
            request.settimeout(5)
            try:
                request = ctx.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                self.owner.tls_failures += 1
                request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer is what several tests do on purpose


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        owner = self.server.owner
        size = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(size, 1 << 20))
        owner.requests.append(Recorded(self.path, {k: v for k, v in self.headers.items()}, body))
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error":"not found"}')
            return
        mode = owner.mode
        if mode == "hang":
            owner.stopping.wait()
            return
        if mode == "slow" and owner.stopping.wait(owner.delay_s):
            return
        if mode == "cut_early":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "error":
            echo = self.headers.get("Authorization", "")
            self._send(500, f"internal error: the request had Authorization: {echo}; ".encode() + b"x" * 600)
            return
        if mode == "garbage":
            self._send(200, b"<html><body>502 Bad Gateway</body></html>")
            return
        if mode == "shape":
            self._send(200, b'{"result": {"text": "the temperature is fine"}}')
            return
        if mode == "deep":
            self._send(200, b'{"choices":' + b"[" * 100 + b"]" * 100 + b"}")
            return
        if mode == "big":
            filler = json.dumps({"choices": [{"message": {"content": "x" * (300 * 1024)}}]}).encode()
            self._send(200, filler, length=False)
            return
        answer = owner.answer(json.loads(body), content="" if mode == "empty" else None)
        if mode == "cut":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer[: len(answer) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "drip":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            for i in range(len(answer)):
                if owner.stopping.wait(owner.drip_s):
                    return
                self.wfile.write(answer[i : i + 1])
                self.wfile.flush()
            return
        self._send(200, answer)


class OpenAIServer:
    """Serve on 127.0.0.1, a free port, from a thread; ``close()`` ends every handler."""

    def __init__(self, pack: LoadedPack, tls: tuple[Path, Path] | None = None, model: str = "tiny") -> None:
        # the pack's full context (the fixture engine's is shorter): the escalation prompt is long
        self.engine = Engine(pack, threads=1, context_length=pack.manifest.architecture.max_context)
        self.model = model
        self.mode = "ok"
        self.delay_s = 2.0
        self.drip_s = 0.05
        self.requests: list[Recorded] = []
        self.tls_failures = 0
        self.stopping = threading.Event()
        self.ssl_context: ssl.SSLContext | None = None
        if tls is not None:
            self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ssl_context.load_cert_chain(str(tls[0]), str(tls[1]))
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def answer(self, request: dict[str, Any], content: str | None = None) -> bytes:
        """The OpenAI chat-completion body for ``request``, generated greedily."""
        messages = request["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = [m["content"] for m in messages if m["role"] == "user"][-1]
        max_tokens = min(int(request.get("max_tokens") or 16), 32)
        ids = self.engine.prompt_ids(user, system)
        prompt_tokens = len(ids)
        ids = ids[-(self.engine.context_length - max_tokens) :]
        done = self.engine.generate(GenerationRequest(ids, max_tokens))
        doc = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text if content is None else content},
                    "finish_reason": "stop" if done.finish_reason in ("eos", "stop") else "length",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(done.token_ids),
                "total_tokens": prompt_tokens + len(done.token_ids),
            },
        }
        return json.dumps(doc).encode()

    def close(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> OpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
