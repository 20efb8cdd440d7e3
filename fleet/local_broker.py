"""A private Mosquitto on a free local port: the zero-set-up broker and the test broker.

``edge-fleet serve`` without ``--broker`` runs one of these, and the test suite uses the same
class, so what the tests exercise is what a newcomer gets. It runs in the foreground as a
child process (no ``-d``: no pid file or privilege drop to manage) and is configured so it
cannot lose QoS 1 traffic to a slow consumer: Mosquitto's default ``max_queued_messages``
of 1000 silently drops messages beyond it.

Given the production broker directory (``deploy/mosquitto``), it runs that directory's
``mosquitto.conf`` with only the port and the paths changed, and makes accounts with its
``add-account.sh``: the test suite exercises the shipped broker set-up, not a lookalike.
"""

from __future__ import annotations

import ctypes
import getpass
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from agent.mqtt import BrokerAddress
from agent.private_file import write_private
from fleet.broker.accounts import new_password
from fleet.broker.dynsec import ADMIN_ACCOUNT, initial_store

__all__ = ["BrokerNotFound", "LocalBroker", "free_port", "production_config"]


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


DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def find_dynamic_security_plugin(configured: str) -> str:
    """The configured plugin path, or the same library where this system keeps it."""
    if Path(configured).exists():
        return configured
    name = Path(configured).name
    directories = [Path("/usr/lib"), Path("/usr/local/lib"), Path("/usr/lib64")]
    for found in [d / name for d in directories] + sorted(Path("/usr/lib").glob(f"*/{name}")):
        if found.exists():
            return str(found)
    raise BrokerNotFound(f"Mosquitto's dynamic-security plugin ({name}) is not installed")


def production_config(
    template: str, *, port: int, work_dir: Path, user: str, persistence: bool = True
) -> str:
    """``deploy/mosquitto/mosquitto.conf`` with only the port, the paths and the user changed:
    a loopback listener on ``port``, every file under ``work_dir``, log to stderr."""
    replaced = {
        "listener": f"{port} 127.0.0.1",
        "user": user,
        "pid_file": str(work_dir / "mosquitto.pid"),
        "persistence": "true" if persistence else "false",
        "persistence_location": f"{work_dir}/",
        "plugin_opt_config_file": str(work_dir / "dynamic-security.json"),
    }
    lines = []
    for line in template.splitlines():
        key, _, value = line.strip().partition(" ")
        if key in replaced:
            line = f"{key} {replaced[key]}"
        elif key == "plugin":
            line = f"plugin {find_dynamic_security_plugin(value.strip())}"
        elif key == "log_dest":
            continue  # the log goes to stderr, which start() keeps in mosquitto.log
        lines.append(line)
    return "\n".join(lines) + "\n"


class LocalBroker:
    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        *,
        extra_config: str = "",
        persistence: bool = True,
        deploy_dir: Path | None = None,
        accounts: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        """With ``deploy_dir`` (``deploy/mosquitto``) the broker runs the production
        configuration and takes only accounts added by :meth:`add_account`. With
        ``accounts`` it runs the same scheme set up from Python (what ``edge-fleet serve``
        starts: no anonymous access; the fleet manages accounts through
        :meth:`admin_address`), listening on ``host``. With neither, it is open to anyone
        on loopback (tests of the MQTT link only)."""
        self.work_dir = work_dir
        self.port = port or free_port()
        self.host = host
        self.accounts = accounts and deploy_dir is None
        self.extra_config = extra_config
        self.persistence = persistence
        self.deploy_dir = deploy_dir
        self.config_path = work_dir / "mosquitto.conf"
        self.passwords: dict[str, str] = {}
        self.log_path = work_dir / "mosquitto.log"
        self._process: subprocess.Popen | None = None

    @property
    def reach_host(self) -> str:
        """Where a process on this host connects (a wildcard bind: loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def url(self) -> str:
        return f"mqtt://{self.reach_host}:{self.port}"

    @property
    def admin_password_path(self) -> Path:
        return self.work_dir / "admin-password"

    @property
    def store_path(self) -> Path:
        return self.work_dir / "dynamic-security.json"

    def admin_address(self) -> BrokerAddress:
        """The dynamic-security admin account, over loopback: the one this class made
        (``accounts``), or the one ``add-account.sh --init`` made (``deploy_dir``)."""
        if self.deploy_dir is not None:
            # add-account.sh keeps it as mosquitto_rr options: -u NAME / -P PASSWORD / -i ID
            options = (self.work_dir / "edgefleet-admin" / "mosquitto_rr").read_text().split()
            password = options[options.index("-P") + 1]
        elif self.accounts:
            password = self.admin_password_path.read_text().strip()
        else:
            raise RuntimeError("an open broker has no accounts to manage")
        return BrokerAddress(self.reach_host, self.port, username=ADMIN_ACCOUNT,
                             password=password)

    def _make_store(self) -> None:
        """The account store and its admin password, once per directory (both 0600)."""
        if self.store_path.exists():
            if not self.admin_password_path.is_file():
                raise RuntimeError(
                    f"{self.store_path} exists but {self.admin_password_path} does not: the "
                    "broker's accounts cannot be managed; move the store away to start anew "
                    "(every device then enrolls again)")
            return
        password = new_password()
        write_private(self.admin_password_path, password.encode() + b"\n")
        write_private(self.store_path, json.dumps(initial_store(password), indent=1).encode())

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

    def add_account(self, user: str) -> str:
        """Add an account (or give it a new password) with the production
        ``add-account.sh``, on the running broker; returns its password."""
        if self.deploy_dir is None:
            raise RuntimeError("an open broker has no accounts (start it with deploy_dir)")
        if self.pid is None:
            raise RuntimeError("accounts are added on the running broker: start it first")
        url = self._account_script(user, str(self.config_path), "127.0.0.1")
        password = unquote(urlsplit(url).password or "")
        self.passwords[user] = password
        return password

    def _account_script(self, *args: str) -> str:
        assert self.deploy_dir is not None
        done = subprocess.run(
            ["bash", str(self.deploy_dir / "add-account.sh"), *args],
            capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"add-account.sh {args[0]} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def _write_config(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Keep running as whoever started us: no drop to a `mosquitto` user that could
        # not write our directory.
        user = getpass.getuser()
        if self.deploy_dir is not None:
            text = production_config(
                (self.deploy_dir / "mosquitto.conf").read_text(), port=self.port,
                work_dir=self.work_dir, user=user, persistence=self.persistence,
            )
            self.config_path.write_text(text + self.extra_config)
            return self.config_path
        if self.accounts:
            self._make_store()
        lines = [
            f"listener {self.port} {self.host}",
            *(["allow_anonymous false",
               "plugin " + find_dynamic_security_plugin(DYNSEC_PLUGIN),
               f"plugin_opt_config_file {self.store_path}"] if self.accounts
              else ["allow_anonymous true"]),
            f"user {user}",
            "max_queued_messages 1000000",
            "max_inflight_messages 100",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
        ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.work_dir}/"]
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config)
        return self.config_path

    def start(self, timeout: float = 10.0) -> LocalBroker:
        if self._process is not None and self._process.poll() is None:
            return self
        config = self._write_config()
        if self.deploy_dir is not None and not (self.work_dir / "dynamic-security.json").exists():
            self._account_script("--init", str(config))
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
                with socket.create_connection((self.reach_host, self.port), timeout=0.5):
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
