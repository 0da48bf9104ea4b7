"""Audit: checkpoints for gc and verification, roles.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    pass  # reserved: filled in by the feature that owns this revision
