"""A private mosquitto on a free loopback port, for the demo and the tests.

Each instance gets its own generated config and directory; nothing is shared with a
system broker. ``stop()``/``start()`` keep the port so clients can reconnect to it;
``close()`` (or leaving the ``with`` block) stops it and removes its directory. A directory
the broker made itself is also removed when the object is collected or the process exits,
so a caller that only stops it leaves no ``edge-mosquitto-*`` folder behind.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path


class BrokerUnavailable(RuntimeError):
    """No mosquitto binary; the message says how to install it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if path is None:
        raise BrokerUnavailable("mosquitto is not installed: sudo apt-get install -y mosquitto")
    return path


class LocalBroker:
    def __init__(self, port: int | None = None, workdir: Path | None = None, listener_conf: str = "") -> None:
        """``listener_conf``: extra lines for the listener (TLS files, password_file, ...)."""
        self.port = port or free_port()
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="edge-mosquitto-"))
        # only a directory made here is removed unasked; a caller's stays until close()
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        if workdir is not None:
            self._remove_dir.detach()
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.conf.write_text(
            # mosquitto started as root drops to user "mosquitto", which could not write
            # its log and sessions here: stay the user who started it
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            f"{listener_conf}"
            f"allow_anonymous {'false' if 'password_file' in listener_conf else 'true'}\n"
            "set_tcp_nodelay true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 10000\n"
        )
        self.binary = find_mosquitto()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        # its own session: a Ctrl-C in the terminal (make demo) reaches the agent and this
        # process, which stop the broker last, instead of killing the broker under a live agent
        # (which then logged a lost connection while stopping)
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerUnavailable(f"mosquitto exited with {self.proc.returncode}; see {self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise BrokerUnavailable(f"mosquitto did not listen on {self.port} within {timeout_s}s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        """Stop the broker and remove its directory (config, log, persistence)."""
        self.stop()
        self._remove_dir.detach()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
