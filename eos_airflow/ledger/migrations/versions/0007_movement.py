"""Data movement: source offsets and the transactional outbox.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    pass  # reserved: filled in by the feature that owns this revision
