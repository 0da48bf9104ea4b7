"""Provenance, input fingerprints and asset announcements of each committed version.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from alembic import context, op

from eos_airflow.ledger.queries import execute_script

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    execute_script(op.get_bind().connection.driver_connection, "0013_provenance.sql", schema)
