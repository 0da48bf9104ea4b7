"""Recovery points for chunked effects (checkpointed long tasks).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    pass  # reserved: filled in by the feature that owns this revision
