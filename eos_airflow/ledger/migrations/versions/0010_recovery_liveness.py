"""Recovery touches only abandoned owners; a multi-database claim is durable before PREPARE.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0010_recovery_liveness.sql", schema)
