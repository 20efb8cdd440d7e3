"""Writing a secret (a key, a password, a token) to a file nobody else may read.

Shared by the agent (its identity and key) and the fleet (its admin token, its broker's
admin password): one way to do it, with no moment where the bytes sit in a file with
wider rights: a fresh 0600 temporary file beside the target (``mkstemp``: O_EXCL, no
symlink games), fsynced, renamed over the target, the directory fsynced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
