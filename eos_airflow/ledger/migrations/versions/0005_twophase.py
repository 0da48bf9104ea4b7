"""Two- and three-phase commit across several databases: decision log.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0005_twophase.sql", schema)
