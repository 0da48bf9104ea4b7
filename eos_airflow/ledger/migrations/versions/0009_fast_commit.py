"""is_awaited() in PL/pgSQL: commit() no longer re-plans it on every call.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0009_fast_commit.sql", schema)
