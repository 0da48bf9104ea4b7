"""Least privilege: the protocol runs as the ledger's owner; the writer only executes it.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0011_least_privilege.sql", schema)
