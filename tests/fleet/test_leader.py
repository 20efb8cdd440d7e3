"""One leader among fleet workers sharing a PostgreSQL database (``fleet.leader``).

Real PostgreSQL: each "worker" is a Leadership on an engine of its own, as in separate
processes. A dead worker is played by ending its database session from the server side
(``pg_terminate_backend``), which is what PostgreSQL sees when a process is SIGKILLed;
the SIGKILL itself is exercised in ``tests/e2e/test_fleet_workers.py``.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from fleet.db import make_engine
from fleet.leader import ADVISORY_KEY, Leadership
from fleet.periodic import Periodic
from tests.fixtures.waiting import wait_until


def _holder_pid(engine) -> int | None:
    with engine.connect() as connection:
        return connection.execute(text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = :key"), {"key": ADVISORY_KEY}
        ).scalar()


@pytest.mark.postgres
def test_one_worker_leads_and_the_role_moves_when_it_dies_or_stops(postgres_url):
    engines = [make_engine(postgres_url) for _ in range(3)]
    changes: dict[str, list[bool]] = {"a": [], "b": []}
    a = Leadership(engines[0], "a", check_s=0.2, on_change=changes["a"].append).start()
    wait_until(lambda: a.is_leader, timeout=20, what="the first worker to lead")
    b = Leadership(engines[1], "b", check_s=0.2, on_change=changes["b"].append).start()
    try:
        # b keeps trying and never leads while a holds the lock
        wait_until(lambda: _holder_pid(engines[2]) is not None, timeout=20, what="a lock")
        for _ in range(5):
            assert a.is_leader and not b.is_leader
            b._stop.wait(0.2)

        # a's session ends as a killed process's would: b takes over, a steps down
        with engines[2].connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"),
                          {"pid": _holder_pid(engines[2])})
        wait_until(lambda: b.is_leader, timeout=20, what="b to take the role")
        wait_until(lambda: not a.is_leader, timeout=20, what="a to notice and step down")
        assert changes["a"][:2] == [True, False]
        assert changes["b"] == [True]

        # a clean stop hands the role back without waiting for a session to die
        b.stop()
        assert not b.is_leader
        wait_until(lambda: a.is_leader, timeout=20, what="a to lead again")
    finally:
        a.stop()
        b.stop()
        for engine in engines:
            engine.dispose()


@pytest.mark.postgres
def test_a_chore_runs_only_where_the_leader_is(postgres_url):
    engines = [make_engine(postgres_url) for _ in range(2)]
    runs = {"a": 0, "b": 0}

    def count(name: str):
        def chore() -> None:
            runs[name] += 1
        return chore

    a = Leadership(engines[0], "a", check_s=0.2).start()
    wait_until(lambda: a.is_leader, timeout=20, what="a to lead")
    b = Leadership(engines[1], "b", check_s=0.2).start()
    chores = [Periodic("chore a", 0.05, count("a"), when=lambda: a.is_leader).start(),
              Periodic("chore b", 0.05, count("b"), when=lambda: b.is_leader).start()]
    try:
        wait_until(lambda: runs["a"] >= 5, timeout=20, what="the leader's chore to run")
        assert runs["b"] == 0
        a.stop()
        wait_until(lambda: runs["b"] >= 5, timeout=20, what="the new leader's chore to run")
        stopped_at = runs["a"]
        b._stop.wait(0.3)
        assert runs["a"] <= stopped_at + 1  # one run may have been under way
    finally:
        for chore in chores:
            chore.stop()
        a.stop()
        b.stop()
        for engine in engines:
            engine.dispose()


def test_sqlite_has_one_worker_which_leads(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    leadership = Leadership(engine, "only").start()
    try:
        assert leadership.is_leader
    finally:
        leadership.stop()
        engine.dispose()
