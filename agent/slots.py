"""A/B model slots with an atomic switch.

Layout in the state directory::

    slots/a/  slots/b/     unpacked bundles; a slot counts only with its .complete marker
    current -> slots/a     a relative symlink: the one source of truth for what runs

The switch writes ``current.new`` pointing at the other slot, fsyncs the directory, renames
it over ``current`` (atomic on POSIX) and fsyncs again. A power cut at any moment leaves
``current`` at the old slot or the new one, both complete; a stray ``current.new`` is
removed at start-up. The inactive slot is the only one ever written.

One owner at a time: the slots are only changed by a process holding ``slots.lock``
(:meth:`Slots.try_lock`, an ``flock`` the kernel releases when the process dies). The
daemon holds it for its whole life and changes the slots from one thread (the
reconciler); ``edge-agent rollback`` asks the daemon, and takes the lock itself only when
no daemon runs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from agent.bundle import COMPLETE_MARKER, fsync_dir
from agent.faults import crash_point

__all__ = ["SLOT_NAMES", "Slots", "SlotsBusyError"]

SLOT_NAMES = ("a", "b")


class SlotsBusyError(RuntimeError):
    """Another process owns these slots (a running agent)."""


class Slots:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.slots_dir = state_dir / "slots"
        self.link = state_dir / "current"
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None

    def try_lock(self) -> bool:
        """Become the one process that changes these slots; False if another one is."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.state_dir / "slots.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def path(self, name: str) -> Path:
        return self.slots_dir / name

    def recover(self) -> None:
        """Finish or undo whatever a crash interrupted (idempotent)."""
        stray = self.link.with_name("current.new")
        if stray.is_symlink() or stray.exists():
            stray.unlink()
            fsync_dir(self.state_dir)

    def active(self) -> str | None:
        if not self.link.is_symlink():
            return None
        name = Path(os.readlink(self.link)).name
        return name if name in SLOT_NAMES else None

    def inactive(self) -> str:
        return "b" if self.active() == "a" else "a"

    def is_complete(self, name: str) -> bool:
        return (self.path(name) / COMPLETE_MARKER).is_file()

    def clear(self, name: str) -> Path:
        """Empty a slot for staging; refuses to touch the active one."""
        if name == self.active():
            raise RuntimeError(f"slot {name} is active and cannot be cleared")
        path = self.path(name)
        if path.exists():
            shutil.rmtree(path)
        return path

    def activate(self, name: str) -> None:
        if not self.is_complete(name):
            raise RuntimeError(f"slot {name} is not a complete install")
        new = self.link.with_name("current.new")
        if new.is_symlink() or new.exists():
            new.unlink()
        os.symlink(f"slots/{name}", new)
        fsync_dir(self.state_dir)
        crash_point("during_swap")
        os.replace(new, self.link)
        fsync_dir(self.state_dir)
