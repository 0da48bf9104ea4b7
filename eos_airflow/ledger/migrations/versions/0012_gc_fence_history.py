"""gc keeps the fencing history: the highest try of each run whose claim it pruned.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0012_gc_fence_history.sql", schema)
