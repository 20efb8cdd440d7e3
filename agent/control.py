"""The running agent's control socket: how ``edge-agent rollback`` reaches the daemon.

``<state dir>/agent.sock``, a Unix stream socket, mode 0600 (only the agent's own user, or
root, may connect). One JSON object per line each way, one request per connection::

    -> {"command": "rollback"}
    <- {"ok": true, "from": {"name": "detector", "version": 2},
        "to": {"name": "detector", "version": 1}, "slot": "a"}
    <- {"ok": false, "reason": "rollback_refused", "error": "already rolled back ..."}

Requests are bounded (one line of at most 4 KiB, read within 5 s). The daemon binds the
socket only while it holds the slots' lock, so a socket file that refuses connections is
a leftover of a crash: :func:`request` then raises :class:`NoDaemonError`, and the caller
may act on the slots itself after taking their lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["MAX_REQUEST_BYTES", "ControlServer", "NoDaemonError", "request", "socket_path"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
_READ_TIMEOUT_S = 5.0
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes on Linux; leave room

Handler = Callable[[], dict[str, Any]]


class NoDaemonError(ConnectionError):
    """No agent is listening on the control socket."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / "agent.sock"


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """A path the kernel accepts: a long one goes through the directory's descriptor."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handlers: dict[str, Handler]

    def server_bind(self) -> None:
        with _address(Path(self.server_address)) as address:
            self.socket.bind(address)


class _RequestHandler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.connection.settimeout(_READ_TIMEOUT_S)
        try:
            line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            if len(line) > MAX_REQUEST_BYTES or not line.endswith(b"\n"):
                raise ValueError("request too long or not one line")
            body = json.loads(line)
            command = body.get("command") if isinstance(body, dict) else None
            handler = self.server.handlers.get(command) if isinstance(command, str) else None
            if handler is None:
                reply = {"ok": False, "reason": "bad_request",
                         "error": f"unknown command {command!r}"}
            else:
                reply = handler()
        except (OSError, ValueError) as exc:
            reply = {"ok": False, "reason": "bad_request", "error": str(exc)}
        with contextlib.suppress(OSError):  # the client gave up waiting
            self.wfile.write(json.dumps(reply).encode() + b"\n")


class ControlServer:
    """Serves ``handlers`` (command name -> function returning the reply) on ``path``."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        # Only the slots' owner gets here: a socket file left by a crash is stale.
        path.unlink(missing_ok=True)
        self._server = _Server(str(path), _RequestHandler, bind_and_activate=False)
        self._server.handlers = handlers
        try:
            self._server.server_bind()
            os.chmod(path, 0o600)
            self._server.server_activate()
        except BaseException:
            self._server.server_close()
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="control", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def request(path: Path, command: str, timeout: float) -> dict[str, Any]:
    """Send ``command`` to the agent listening on ``path``; its reply.

    :class:`NoDaemonError` if none listens (no socket file, or a stale one)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        try:
            with _address(path) as address:
                client.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoDaemonError(f"no agent listening on {path}") from exc
        client.sendall(json.dumps({"command": command}).encode() + b"\n")
        with client.makefile("rb") as answer:
            line = answer.readline(64 * 1024)
    finally:
        client.close()
    if not line:
        raise ConnectionError(f"the agent on {path} closed the connection without a reply")
    reply = json.loads(line)
    if not isinstance(reply, dict):
        raise ValueError(f"the agent on {path} sent {line[:100]!r}")
    return reply
