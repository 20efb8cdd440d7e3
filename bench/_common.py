"""What the fleet benchmarks share: the PostgreSQL server they use, a fresh database on it,
and the CPU time of processes read from Linux's /proc."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_ADMIN = os.environ.get("EDGEFLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int | None) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 of proc(5) is [0]), or
    None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, TypeError):
        return None


def cpu_seconds(pids: list[int | None], children: bool = False) -> float:
    """User + system CPU time of these processes so far (Linux /proc); ``children``: with
    the time of their children that ended and were waited for."""
    ticks = 0
    for pid in pids:
        fields = proc_stat(pid)
        if fields is None:
            continue
        ticks += int(fields[11]) + int(fields[12])
        if children:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def postgres_pids() -> list[int | None]:
    """Every PostgreSQL server process on this machine (the benchmark's database is the
    only busy one while it runs)."""
    pids: list[int | None] = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("postgres", "postmaster"):
                pids.append(int(comm.parent.name))
        except OSError:
            continue
    return pids


@contextmanager
def fresh_database(prefix: str = "edgefleet_bench") -> Iterator[str]:
    """A new, uniquely named database on the server at ``PG_ADMIN``, dropped afterwards
    whatever happened (connections still open to it included); yields its URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
