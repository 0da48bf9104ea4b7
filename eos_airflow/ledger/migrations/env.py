"""Ledger tier: Alembic environment for the ledger schema (run by eos_airflow.ledger.migrate, not by
hand)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.schema import CreateSchema

from eos_airflow.ledger.migrate import MIGRATION_LOCK, record_applied

config = context.config
schema: str = config.attributes["schema"]
connection = config.attributes["connection"]

context.configure(
    connection=connection,
    version_table="alembic_version",
    version_table_schema=schema,
    transaction_per_migration=False,
    # Alembic calls the hook with keyword arguments, its annotation says positional ones
    on_version_apply=record_applied,  # type: ignore[arg-type]
)

with context.begin_transaction():
    # Two `db migrate` at once: the second waits here, then finds the schema up to date.
    connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": MIGRATION_LOCK})
    connection.execute(CreateSchema(schema, if_not_exists=True))
    context.run_migrations()
