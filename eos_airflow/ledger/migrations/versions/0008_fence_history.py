"""Fencing remembers every try that claimed a key; the commit event names its owner token.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0008_fence_history.sql", schema)
