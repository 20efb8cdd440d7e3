"""Resource figures of the agent process, read from the OS without extra dependencies.

Devices are Raspberry Pi class Linux boxes: ``/proc`` is there, psutil may not be, so this
reads ``/proc/self/status`` and falls back to ``resource`` elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import time
from dataclasses import dataclass

__all__ = ["ProcessSample", "ProcessSampler", "release_free_memory", "rss_mb"]


def rss_mb() -> float:
    """Current resident set size in MiB (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def release_free_memory() -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``). Loading and health-checking
    a model frees a lot of temporary memory that glibc would otherwise keep: on a device
    with a few hundred MB, idle RSS is what counts. A no-op where glibc is absent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class ProcessSample:
    uptime_s: float
    cpu_percent: float
    rss_mb: float


class ProcessSampler:
    """CPU % is averaged over the time since the previous sample (one core = 100 %)."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._last_wall = self._started
        self._last_cpu = self._cpu_seconds()

    @staticmethod
    def _cpu_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def sample(self) -> ProcessSample:
        now, cpu = time.monotonic(), self._cpu_seconds()
        wall = now - self._last_wall
        percent = 100.0 * (cpu - self._last_cpu) / wall if wall > 0 else 0.0
        self._last_wall, self._last_cpu = now, cpu
        return ProcessSample(
            uptime_s=round(now - self._started, 3),
            cpu_percent=round(max(percent, 0.0), 2),
            rss_mb=round(rss_mb(), 2),
        )
