"""Several fleet workers starting at once on a fresh PostgreSQL database all come up, and
the schema is made for the write load (the device table leaves room for HOT updates)."""

from __future__ import annotations

import threading

from sqlalchemy import inspect, text

from fleet.db import init_db, make_engine


def test_concurrent_schema_creation_on_a_fresh_database(postgres_url):
    engines = [make_engine(postgres_url) for _ in range(4)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def create(engine) -> None:
        start.wait()
        try:
            init_db(engine)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        assert {"device", "heartbeat", "apitoken"} <= set(inspect(engines[0]).get_table_names())
        init_db(engines[0])  # and again on an existing schema: nothing to do, no error
        with engines[0].connect() as connection:  # room in each page for HOT updates
            options = connection.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = 'device'")).scalar()
        assert options == ["fillfactor=50"]
    finally:
        for engine in engines:
            engine.dispose()
