"""One running fleet per data directory.

A data directory holds a fleet's SQLite file, admin token, signing keys and local broker.
Two ``edge-fleet serve`` on one directory would start two brokers rewriting each other's
files and re-sign the same metadata; so ``serve`` holds an exclusive lock on the directory
for as long as it runs (``flock``: released by the kernel when the process dies, so a crash
never leaves a stale lock), and a second one is refused naming the first one's pid.

The local broker's port is chosen once per directory and stored, so agents given its URL
find the fleet again after a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["DataDirBusy", "DataDirLock", "local_broker_port"]

LOCK_NAME = "serve.lock"
BROKER_PORT_NAME = "broker-port"


class DataDirBusy(RuntimeError):
    """Another process runs a fleet on this data directory."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirBusy(
                f"another edge-fleet serve (pid {holder}) runs on {self.path.parent}; "
                "stop it, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def local_broker_port(data_dir: Path, choose) -> int:
    """The port stored for this directory's local broker, or ``choose()``'s, stored."""
    stored = data_dir / BROKER_PORT_NAME
    if stored.exists():
        text = stored.read_text().strip()
        if text.isdigit() and 0 < int(text) < 65536:
            return int(text)
    port = int(choose())
    stored.write_text(f"{port}\n")
    return port
