"""API token roles, apart from the table models so the CLI can name them without loading
the ORM (``edge-fleet --help`` should not pay for SQLAlchemy)."""

from __future__ import annotations

import enum

__all__ = ["Role"]


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"
