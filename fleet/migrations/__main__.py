"""``python -m fleet.migrations revision "what changed"``: write the next revision from the
difference between ``fleet.models`` and a scratch SQLite database migrated to head.

A draft to review, not a finished revision: SQLite shows no PostgreSQL-only options
(``postgresql_with``), triggers or data changes, and a renamed column comes out as a
dropped one plus a new one.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from alembic import command

from fleet.db import make_engine
from fleet.migrations import _script, alembic_config, upgrade


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fleet.migrations")
    commands = parser.add_subparsers(dest="command", required=True)
    revision = commands.add_parser("revision", help="write the next revision (a draft)")
    revision.add_argument("message", help="what the revision changes, e.g. 'enrollment codes'")
    args = parser.parse_args(argv)

    number = len(list(_script().walk_revisions())) + 1
    slug = re.sub(r"[^a-z0-9]+", "_", args.message.lower()).strip("_")
    rev_id = f"{number:04d}_{slug}"[:32].rstrip("_")  # alembic_version holds 32 characters
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(f"sqlite:///{Path(scratch) / 'head.db'}")
        try:
            upgrade(engine)
            with engine.connect() as connection:
                config = alembic_config()
                config.set_main_option("file_template", "%%(rev)s")
                config.attributes["connection"] = connection
                command.revision(config, args.message, autogenerate=True, rev_id=rev_id)
        finally:
            engine.dispose()


if __name__ == "__main__":
    main()
