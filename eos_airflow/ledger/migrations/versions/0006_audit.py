"""Audit: gc that keeps history verifiable (pruned_chains, the `pruned` event, gc_prune()).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0006_audit.sql", schema)
