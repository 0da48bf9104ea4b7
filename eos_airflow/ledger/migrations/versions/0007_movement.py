"""Data movement: the transactional outbox and the consumers' inbox (source offsets: 0004).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0007_movement.sql", schema)
