"""``edge-fleet serve``: the repository's static files over HTTP, with Range requests.

Any web server or CDN can serve the repository; this one exists so a fleet manager (and
the tests) can serve it without one. Single byte ranges are enough for resumed downloads.
"""

from __future__ import annotations

import os
import re
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    timeout = 30  # seconds a silent client may hold a connection (slowloris)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the fleet logs elsewhere
        pass

    def list_directory(self, path: Any) -> None:
        """No listings: a repository is read by names its signed metadata gives."""
        self.send_error(HTTPStatus.NOT_FOUND)

    def send_head(self) -> Any:
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        m = _RANGE.match(rng or "")
        if not m or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        if start >= size or end < start:  # e.g. bytes=10-5: never a negative length
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            return None
        fh = path.open("rb")
        fh.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._range_left = end - start + 1
        return fh

    def copyfile(self, source: Any, outputfile: Any) -> None:
        left = getattr(self, "_range_left", None)
        if left is None:
            super().copyfile(source, outputfile)
            return
        while left > 0:
            chunk = source.read(min(1 << 16, left))
            if not chunk:
                break
            outputfile.write(chunk)
            left -= len(chunk)


def make_server(
    repo_dir: Path, host: str = "127.0.0.1", port: int = 8080, handler: type[RangeHandler] = RangeHandler
) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), partial(handler, directory=os.fspath(repo_dir)))


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return t
