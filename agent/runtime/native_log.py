"""Native runtime chatter on file descriptor 2, turned into log records.

LiteRT's C++ logger writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." straight
to fd 2 every time an interpreter is created, below Python and with no switch to turn it
off, so ``edge-agent infer model.tflite`` printed it before every result or error, and the
daemon's log got an unformatted line per model load. :func:`native_stderr_to_log` points
fd 2 at a temporary file around such a native call, then logs the ``INFO:`` lines at debug
level and writes everything else back to the real stderr: nothing is lost, warnings and
errors still show. Anything another thread writes to stderr in that window (milliseconds)
is written back too, after the call. Known gap: if the native call kills the process
(a segfault), what it wrote in the window dies with the temporary file; the agent's own
"loading" log line, written before, still says which model it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

__all__ = ["native_stderr_to_log"]


# fd 2 is one per process: two threads swapping it at once would restore each other's
# temporary file, and stderr would stay lost. Loads are rare; they take turns.
_swap_lock = threading.Lock()


@contextlib.contextmanager
def native_stderr_to_log(log: logging.Logger) -> Iterator[None]:
    with _swap_lock:
        with contextlib.suppress(AttributeError, ValueError):
            sys.stderr.flush()
        try:
            capture = tempfile.TemporaryFile()  # noqa: SIM115 (entered just below)
        except OSError:  # no writable temporary directory: leave stderr alone
            yield
            return
        with capture:
            try:
                saved = os.dup(2)
            except OSError:  # no fd 2 at all (a detached process): nothing to filter
                yield
                return
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(AttributeError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                # Never let writing the capture back hide the call's own exception.
                with contextlib.suppress(OSError):
                    capture.seek(0)
                    _replay(capture.read().decode("utf-8", errors="replace"), log)


def _replay(text: str, log: logging.Logger) -> None:
    kept = []
    for line in text.splitlines(keepends=True):
        if line.startswith("INFO: "):
            log.debug("runtime: %s", line.removeprefix("INFO: ").rstrip())
        else:
            kept.append(line)
    if kept:
        os.write(2, "".join(kept).encode("utf-8", errors="replace"))
