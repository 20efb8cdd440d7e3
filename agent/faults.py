"""Named crash points for the crash-safety tests.

``EDGE_AGENT_CRASH_AT=after_download`` (or ``during_unpack``, ``after_health_check``,
``during_swap``) makes the agent SIGKILL itself at that point of an install, exactly as a
power cut would stop it. Unset, this is one dictionary lookup. The tests then restart the
agent and check it serves a verified model.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_POINTS", "crash_point"]

CRASH_POINTS = ("after_download", "during_unpack", "after_health_check", "during_swap")


def crash_point(name: str) -> None:
    if os.environ.get("EDGE_AGENT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
