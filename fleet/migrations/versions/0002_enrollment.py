"""Enrollment: one-time codes and the identity each device enrolled with.

Revision ID: 0002_enrollment
Revises: 0001_baseline
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_enrollment"
down_revision: str | Sequence[str] | None = "0001_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "enrollment_code",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("expires_at", _tz(), nullable=False),
        sa.Column("used_at", _tz(), nullable=True),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_enrollment_code_secret_hash", "enrollment_code", ["secret_hash"],
                    unique=True)
    op.create_index("ix_enrollment_code_device_id", "enrollment_code", ["device_id"])
    op.create_table(
        "device_identity",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("enrolled_at", _tz(), nullable=False),
        sa.Column("revoked_at", _tz(), nullable=True),
        sa.Column("broker_account", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )


def downgrade() -> None:
    op.drop_table("device_identity")
    op.drop_index("ix_enrollment_code_device_id", table_name="enrollment_code")
    op.drop_index("ix_enrollment_code_secret_hash", table_name="enrollment_code")
    op.drop_table("enrollment_code")
