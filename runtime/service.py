"""Running under systemd: the notify protocol (sd_notify(3)) and the unit that uses it.

`Notifier` sends READY=1 once protection is in place (so `systemctl start policyc@GUEST` returns
only then, and units ordered after it start with the guest protected), WATCHDOG=1 from the
answering loop (a loop that stops answering is restarted by systemd, whose restart re-installs
from a clean domain: install refuses a domain another agent holds, and `ExecStopPost` recovers),
STOPPING=1 when teardown begins, and STATUS= lines. Outside systemd ($NOTIFY_SOCKET unset) every
call does nothing. The protocol is a datagram of `KEY=VALUE` lines to a Unix socket; no library.
"""

from __future__ import annotations

import os
import socket
import time
from importlib import resources
from typing import Callable, Mapping

__all__ = ["Notifier", "unit_text"]


class Notifier:
    """systemd's notify socket, from the environment systemd gives a `Type=notify` service."""

    def __init__(self, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        where = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket; a path is a socket file
        self.address = ("\0" + where[1:]) if where.startswith("@") else where
        self.clock = clock
        interval = 0.0
        if env.get("WATCHDOG_USEC", "").isdigit() and env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
            interval = int(env["WATCHDOG_USEC"]) / 1e6
        # ping at half the interval, as sd_watchdog_enabled(3) advises
        self.watchdog_every = interval / 2
        self._last_ping: float | None = None
        self._sock: socket.socket | None = None
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def stopping(self, status: str = "") -> None:
        self._send("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        """A ping, when one is due (cheap to call on every loop turn)."""
        if not self.watchdog_every:
            return
        now = self.clock()
        if self._last_ping is None or now - self._last_ping >= self.watchdog_every:
            self._last_ping = now
            self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> None:
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self.address)
        except OSError:
            # systemd gone or the socket full: enforcement must not stop for want of a status line
            self.errors += 1


def unit_text() -> str:
    """The `policyc@.service` template unit shipped with the package."""
    return resources.files("policyc.runtime").joinpath("policyc@.service").read_text(encoding="utf-8")
