"""Two- and three-phase commit across several databases: decision log.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    pass  # reserved: filled in by the feature that owns this revision
