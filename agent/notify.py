"""systemd notify protocol (sd_notify) without libsystemd: READY, WATCHDOG, STATUS, STOPPING."""

from __future__ import annotations

import socket

import structlog

log = structlog.get_logger("edge_agent.notify")


class Notifier:
    """Sends datagrams to ``NOTIFY_SOCKET``; a no-op when not run by systemd."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None) -> None:
        self.path = socket_path
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec else None

    def send(self, *lines: str) -> bool:
        if not self.path:
            return False
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), address)
            return True
        except OSError as exc:
            log.warning("sd_notify_failed", reason=str(exc))
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
