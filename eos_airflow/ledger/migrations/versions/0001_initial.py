"""Initial ledger: effect states, hash-chained events, protocol functions.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

from eos_airflow.ledger.queries import execute_script

revision = "0001"
down_revision = None

_STATES = ("running", "committed", "failed")
_KINDS = ("claimed", "committed", "replaced", "skipped", "fenced", "failed")


def upgrade() -> None:
    schema = context.config.attributes["schema"]
    state = pg.ENUM(*_STATES, name="effect_state", schema=schema)
    kind = pg.ENUM(*_KINDS, name="event_kind", schema=schema)
    state.create(op.get_bind())
    kind.create(op.get_bind())
    key = sa.Text(collation="C")
    ts = sa.TIMESTAMP(timezone=True)
    op.create_table(
        "ledger",
        sa.Column("key", key, primary_key=True),
        sa.Column("state", pg.ENUM(name="effect_state", schema=schema, create_type=False),
                  nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("owner", pg.UUID, comment="token of the live claim, if any"),
        sa.Column("dag_id", sa.Text),
        sa.Column("task_id", sa.Text),
        sa.Column("run_id", sa.Text),
        sa.Column("map_index", sa.Integer),
        sa.Column("host", sa.Text),
        sa.Column("pid", sa.Integer),
        sa.Column("result", pg.JSONB),
        sa.Column("version", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("claimed_at", ts, nullable=False),
        sa.Column("committed_at", ts),
        sa.Column("updated_at", ts, nullable=False),
        sa.Column("event_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("last_hash", sa.LargeBinary, nullable=False),
        schema=schema,
    )
    op.create_index("ledger_origin_idx", "ledger", ["dag_id", "task_id", "run_id"], schema=schema)
    op.create_index("ledger_state_idx", "ledger", ["state"], schema=schema)
    op.create_table(
        "ledger_events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("key", key, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("event", pg.ENUM(name="event_kind", schema=schema, create_type=False),
                  nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", ts, nullable=False),
        sa.Column("detail", pg.JSONB, nullable=False),
        sa.Column("prev_hash", sa.LargeBinary, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("key", "seq", name="ledger_events_key_seq_key"),
        schema=schema,
    )
    op.create_index("ledger_events_at_idx", "ledger_events", ["at"], schema=schema)
    op.create_table(
        "schema_migrations",
        sa.Column("revision", sa.Text, primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("checksum", sa.Text, nullable=False, comment="sha256 of the migration file"),
        sa.Column("package_version", sa.Text, nullable=False),
        sa.Column("applied_at", ts, nullable=False, server_default=sa.text("now()")),
        schema=schema,
    )
    execute_script(op.get_bind().connection.driver_connection, "0001_functions.sql", schema)
