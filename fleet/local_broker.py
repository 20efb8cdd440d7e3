"""A private Mosquitto on a free local port: the zero-set-up broker and the test broker.

``edge-fleet serve`` without ``--broker`` runs one of these, and the test suite uses the same
class, so what the tests exercise is what a newcomer gets. It runs in the foreground as a
child process (no ``-d``: no pid file or privilege drop to manage) and is configured so it
cannot lose QoS 1 traffic to a slow consumer: Mosquitto's default ``max_queued_messages``
of 1000 silently drops messages beyond it.
"""

from __future__ import annotations

import ctypes
import getpass
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["BrokerNotFound", "LocalBroker", "free_port"]


class BrokerNotFound(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Loaded here, not in the child: between fork and exec only the bare call may run.
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Linux: SIGTERM the broker if its parent dies, even by SIGKILL (no orphan brokers)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerNotFound(
            "no MQTT broker given and `mosquitto` is not installed: "
            "install it (Debian/Ubuntu: `sudo apt-get install -y mosquitto`) "
            "or pass --broker mqtt://HOST:PORT"
        )
    return found


class LocalBroker:
    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        *,
        extra_config: str = "",
        persistence: bool = True,
        acl_file: Path | None = None,
    ) -> None:
        """With ``acl_file`` the broker takes only accounts added by :meth:`add_account`
        and enforces that ACL (``deploy/mosquitto/edgefleet.acl`` in production)."""
        self.work_dir = work_dir
        self.port = port or free_port()
        self.extra_config = extra_config
        self.persistence = persistence
        self.acl_file = acl_file
        self.password_file = work_dir / "passwd"
        self.passwords: dict[str, str] = {}
        self.log_path = work_dir / "mosquitto.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The mosquitto process while it runs (benchmarks account its CPU time)."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def url_for(self, user: str) -> str:
        """The broker URL with ``user``'s credentials (the account is created if needed)."""
        if user not in self.passwords:
            self.add_account(user)
        return f"mqtt://{user}:{self.passwords[user]}@127.0.0.1:{self.port}"

    def add_account(self, user: str, password: str | None = None) -> str:
        """Add an account with ``mosquitto_passwd`` and make a running broker reload."""
        password = password or secrets.token_urlsafe(18)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        if not self.password_file.exists():
            self.password_file.touch(mode=0o600)
        subprocess.run([tool, "-b", str(self.password_file), user, password], check=True,
                       capture_output=True)
        self.passwords[user] = password
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGHUP)  # reloads accounts and the ACL
            time.sleep(0.2)
        return password

    def _write_config(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            *(
                [
                    "allow_anonymous false",
                    f"password_file {self.password_file}",
                    f"acl_file {self.acl_file}",
                ]
                if self.acl_file is not None
                else ["allow_anonymous true"]
            ),
            # Keep running as whoever started us: no drop to a `mosquitto` user that could
            # not write our directory.
            f"user {getpass.getuser()}",
            "max_queued_messages 1000000",
            "max_inflight_messages 100",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
        ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.work_dir}/"]
        config = self.work_dir / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n" + self.extra_config)
        return config

    def start(self, timeout: float = 10.0) -> LocalBroker:
        if self._process is not None and self._process.poll() is None:
            return self
        if self.acl_file is not None and not self.password_file.exists():
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.password_file.touch(mode=0o600)
        config = self._write_config()
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [find_mosquitto(), "-c", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches the fleet, which stops us in order
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._process.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
