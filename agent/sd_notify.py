"""Tell systemd how the daemon is doing: ready, alive, stopping, and a one-line status.

The ``sd_notify(3)`` protocol without libsystemd: one datagram of ``KEY=value`` lines to
the Unix socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``). Outside systemd (the variable unset) every call is a no-op, so the daemon
calls it unconditionally.

What the unit relies on (``deploy/systemd/edge-agent.service``, ``Type=notify``,
``WatchdogSec=``):

* ``READY=1`` only once the daemon's threads run and its main loop is about to start:
  ``systemctl start`` returns then, not when the process merely exists;
* ``WATCHDOG=1`` only from the main loop, after each of its turns: a loop that hangs stops
  the pings and systemd restarts the service (``Restart=on-failure``); a turn comes at
  least every half watchdog period whatever the heartbeat interval (:meth:`Notifier.pulse_s`);
* ``STOPPING=1`` when a stop begins, so the clean shutdown is not taken for a hang;
* ``STATUS=...``, shown by ``systemctl status``: sent when it changes.

A notification that cannot be delivered is logged once and otherwise ignored: telling
systemd is never a reason for the daemon to fail.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

_MAX_STATUS_CHARS = 200


def _address(name: str) -> str | bytes | None:
    """The ``sendto`` address of ``$NOTIFY_SOCKET``: ``@name`` is Linux's abstract
    namespace (a leading NUL byte); anything not a path (``vsock:...``) is not supported."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None


class Notifier:
    """Notifications for the service manager that started this process, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name: systemd is not "
                        "told when the agent is ready", raw)
        self.watchdog_s = _watchdog_s(env)
        self._status: str | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def pulse_s(self, interval_s: float) -> float:
        """How long the main loop may sleep between turns: its interval, or half the
        watchdog period if that is shorter (systemd's advice for a ping's slack)."""
        if self.watchdog_s is None:
            return interval_s
        return min(interval_s, self.watchdog_s / 2)

    def ready(self, status: str) -> None:
        self._send(["READY=1", *self._status_line(status)])

    def alive(self, status: str) -> None:
        """After each turn of the main loop: the watchdog ping, and the status if new."""
        lines = ["WATCHDOG=1"] if self.watchdog_s is not None else []
        lines += self._status_line(status)
        if lines:
            self._send(lines)

    def stopping(self, status: str = "stopping") -> None:
        self._send(["STOPPING=1", *self._status_line(status)])

    def _status_line(self, status: str) -> list[str]:
        status = " ".join(status.split())[:_MAX_STATUS_CHARS]  # one line, bounded
        if status == self._status:
            return []
        self._status = status
        return [f"STATUS={status}"]

    def _send(self, lines: list[str]) -> bool:
        if self._address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd on %s: %s", self._address, exc)
            return False
        return True


def _watchdog_s(env: Mapping[str, str]) -> float | None:
    """The watchdog period systemd expects pings within, or None (no watchdog, or one
    meant for another process: ``WATCHDOG_PID`` names the one it is for)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
