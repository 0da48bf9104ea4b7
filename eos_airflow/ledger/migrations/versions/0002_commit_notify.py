"""Commit notifications: waiters table, and commit() notifies when someone waits.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    op.create_table(
        "waiters",
        sa.Column("key", sa.Text(collation="C"), primary_key=True,
                  comment="an effect key, or a key prefix when is_prefix"),
        sa.Column("is_prefix", sa.Boolean, primary_key=True),
        sa.Column("listener", sa.Text, primary_key=True,
                  comment="the waiting process (host:pid:token)"),
        sa.Column("expires_at", sa.TIMESTAMP(timezone=True), nullable=False),
        schema=schema,
    )
    op.create_index("waiters_prefix_idx", "waiters", ["key"], schema=schema,
                    postgresql_where=sa.text("is_prefix"))
    op.create_index("waiters_listener_idx", "waiters", ["listener"], schema=schema)
    execute_script(op.get_bind().connection.driver_connection, "0002_commit_notify.sql", schema)
