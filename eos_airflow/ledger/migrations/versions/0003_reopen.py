"""Deliberate reprocessing: the `reopened` state and event, and reopen().

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0003_reopen.sql", schema)
