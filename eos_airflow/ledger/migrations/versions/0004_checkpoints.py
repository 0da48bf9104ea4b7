"""Recovery points for chunked effects (checkpointed long tasks), and source offsets.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0004_checkpoints.sql", schema)
