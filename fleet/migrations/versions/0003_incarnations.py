"""Incarnations: a re-flashed device restarts its sequence.

``device`` learns the incarnation its messages carry, its epoch (how many restarts the
fleet has seen), the incarnations before it and when the last restart was; ``heartbeat``
and ``deviceevent`` rows get the epoch they belong to, and their uniqueness moves from
(device_id, seq) to (device_id, epoch, seq): a restarted sequence may reuse seq values.
Existing rows are epoch 0, the epoch of every device until its first restart.

On PostgreSQL the new unique constraint is built while the table is locked for writes
(inside the migration's transaction; CONCURRENTLY cannot be): a large time series waits
for it once. SQLite copies the tables (batch mode), which small fleets do in moments.

Revision ID: 0003_incarnations
Revises: 0002_enrollment
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_incarnations"
down_revision: str | Sequence[str] | None = "0002_enrollment"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's (device_id, seq) constraints have no name: batch mode names what it reflects
# with this convention, so the old constraint can be dropped by that name.
_CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_N_name)s"}


def _old_unique(table: str) -> str:
    """The name of ``table``'s (device_id, seq) unique constraint."""
    for constraint in sa.inspect(op.get_bind()).get_unique_constraints(table):
        if list(constraint["column_names"]) == ["device_id", "seq"]:
            return constraint["name"] or f"uq_{table}_device_id_seq"
    raise RuntimeError(f"{table!r} has no unique constraint on (device_id, seq)")


def upgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.add_column(sa.Column("incarnation", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("epoch", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("past_incarnations", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("reflashed_at", sa.DateTime(timezone=True), nullable=True))
    for table in ("heartbeat", "deviceevent"):
        old = _old_unique(table)
        with op.batch_alter_table(table, naming_convention=_CONVENTION) as batch:
            batch.add_column(sa.Column("epoch", sa.Integer(), server_default="0",
                                       nullable=False))
            batch.drop_constraint(old, type_="unique")
            batch.create_unique_constraint(f"uq_{table}_device_epoch_seq",
                                           ["device_id", "epoch", "seq"])


def downgrade() -> None:
    for table in ("deviceevent", "heartbeat"):
        # Rows of later epochs may repeat a seq: only epoch 0 fits the old constraint.
        op.execute(sa.text(f"DELETE FROM {table} WHERE epoch <> 0"))
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_device_epoch_seq", type_="unique")
            batch.create_unique_constraint(f"uq_{table}_device_id_seq", ["device_id", "seq"])
            batch.drop_column("epoch")
    with op.batch_alter_table("device") as batch:
        batch.drop_column("reflashed_at")
        batch.drop_column("past_incarnations")
        batch.drop_column("epoch")
        batch.drop_column("incarnation")
