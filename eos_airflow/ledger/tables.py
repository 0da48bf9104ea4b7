"""Ledger tier: the ledger tables, declared once as SQLAlchemy Core metadata.

Migrations (``eos_airflow/ledger/migrations``) create exactly this; a test checks that
"all migrations applied" has no difference from this metadata. The hot path never uses
SQLAlchemy: it calls the SQL functions installed by the migrations (``sql/``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from eos_airflow.states import EntryState, EventKind

#: Lifecycle of an effect key and kinds of audit events (eos_airflow/states.py).
EFFECT_STATES = tuple(EntryState)
EVENT_KINDS = tuple(EventKind)

#: Bytes of a SHA-256 digest; the first event of a key chains to this many zero bytes.
HASH_BYTES = 32

# C collation: byte-wise order, the same on every server, and prefix scans (LIKE 'sales/%')
# can use the primary key index.
_KEY = sa.Text(collation="C")


def ledger_metadata(schema: str = "eos") -> sa.MetaData:
    """Return the ledger's tables in ``schema``."""
    metadata = sa.MetaData(schema=schema)
    state = pg.ENUM(*EFFECT_STATES, name="effect_state", schema=schema, create_type=False)
    kind = pg.ENUM(*EVENT_KINDS, name="event_kind", schema=schema, create_type=False)
    sa.Table(
        "ledger",
        metadata,
        sa.Column("key", _KEY, primary_key=True),
        sa.Column("state", state, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("owner", pg.UUID, nullable=True, comment="token of the live claim, if any"),
        sa.Column("dag_id", sa.Text),
        sa.Column("task_id", sa.Text),
        sa.Column("run_id", sa.Text),
        sa.Column("map_index", sa.Integer),
        sa.Column("host", sa.Text),
        sa.Column("pid", sa.Integer),
        sa.Column("result", pg.JSONB),
        sa.Column("version", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("claimed_at", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("committed_at", sa.TIMESTAMP(timezone=True)),
        sa.Column("updated_at", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("event_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("last_hash", sa.LargeBinary, nullable=False),
        sa.Index("ledger_origin_idx", "dag_id", "task_id", "run_id"),
        sa.Index("ledger_state_idx", "state"),
    )
    sa.Table(
        "ledger_events",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("key", _KEY, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("event", kind, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("detail", pg.JSONB, nullable=False),
        sa.Column("prev_hash", sa.LargeBinary, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("key", "seq", name="ledger_events_key_seq_key"),
        sa.Index("ledger_events_at_idx", "at"),
    )
    sa.Table(
        "waiters",
        metadata,
        sa.Column(
            "key", _KEY, primary_key=True, comment="an effect key, or a key prefix when is_prefix"
        ),
        sa.Column("is_prefix", sa.Boolean, primary_key=True),
        sa.Column(
            "listener", sa.Text, primary_key=True, comment="the waiting process (host:pid:token)"
        ),
        sa.Column("expires_at", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Index("waiters_prefix_idx", "key", postgresql_where=sa.text("is_prefix")),
        sa.Index("waiters_listener_idx", "listener"),
    )
    sa.Table(
        "recovery_points",
        metadata,
        sa.Column("key", _KEY, primary_key=True),
        sa.Column(
            "version", sa.Integer, primary_key=True, comment="the effect version being written"
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column(
            "rows", sa.BigInteger, nullable=False, comment="source items consumed up to this point"
        ),
        sa.Column("position", pg.JSONB),
        sa.Column("state", pg.JSONB),
        sa.Column("at", sa.TIMESTAMP(timezone=True), nullable=False),
    )
    sa.Table(
        "offsets",
        metadata,
        sa.Column("source", _KEY, primary_key=True),
        sa.Column("position", pg.JSONB),
        sa.Column("key", _KEY, nullable=False, comment="the effect that committed this position"),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.TIMESTAMP(timezone=True), nullable=False),
    )
    sa.Table(
        "pruned_chains",
        metadata,
        sa.Column("key", _KEY, primary_key=True),
        sa.Column(
            "through_seq",
            sa.BigInteger,
            nullable=False,
            comment="events 1..through_seq were removed",
        ),
        sa.Column(
            "through_hash",
            sa.LargeBinary,
            nullable=False,
            comment="hash of event through_seq: the prev_hash of the first remaining event",
        ),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column(
            "versions",
            sa.Integer,
            nullable=False,
            comment="committed and replaced events among the removed ones",
        ),
        sa.Column("pruned_at", sa.TIMESTAMP(timezone=True), nullable=False),
    )
    sa.Table(
        "versions",
        metadata,
        sa.Column("key", _KEY, primary_key=True),
        sa.Column(
            "version",
            sa.Integer,
            nullable=False,
            server_default=sa.text("0"),
            comment="the committed version the fingerprint belongs to",
        ),
        sa.Column(
            "fingerprint",
            sa.Text,
            comment="fingerprint of the inputs that version was made from (null: none given)",
        ),
        sa.Column(
            "announced",
            sa.Integer,
            nullable=False,
            server_default=sa.text("0"),
            comment="the highest version reported to Airflow as asset events (0: none)",
        ),
        comment="per key, what the ledger row does not hold about its committed versions: "
        "the input fingerprint and the announcements",
    )
    sa.Table(
        "pruned_claims",
        metadata,
        sa.Column("key", _KEY, nullable=False),
        sa.Column("dag_id", sa.Text, nullable=False),
        sa.Column("task_id", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("map_index", sa.Integer),
        sa.Column(
            "attempt",
            sa.Integer,
            nullable=False,
            comment="the highest try of this task instance among the removed claimed events",
        ),
        sa.Column("pruned_at", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Index("pruned_claims_key_idx", "key"),
        comment="per key and task instance, the highest try whose claimed event gc removed: "
        "fencing reads it with the remaining events",
    )
    sa.Table(
        "twophase",
        metadata,
        sa.Column("txid", _KEY, primary_key=True),
        sa.Column("key", _KEY),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("owner", pg.UUID),
        sa.Column("protocol", sa.Text, nullable=False),
        sa.Column(
            "participants",
            pg.JSONB,
            nullable=False,
            comment="name -> gid and conn_id: where each participant's prepared transaction lives",
        ),
        sa.Column(
            "decision", sa.Text, comment="NULL while undecided (presumed abort), commit or abort"
        ),
        sa.Column(
            "outcome", sa.Text, comment="set once every participant finished: committed or aborted"
        ),
        sa.Column(
            "created_at",
            sa.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.Column("decided_at", sa.TIMESTAMP(timezone=True)),
        sa.Column("resolved_at", sa.TIMESTAMP(timezone=True)),
        sa.CheckConstraint("protocol IN ('2pc', '3pc')", name="twophase_protocol_check"),
        sa.CheckConstraint("decision IN ('commit', 'abort')", name="twophase_decision_check"),
        sa.CheckConstraint("outcome IN ('committed', 'aborted')", name="twophase_outcome_check"),
        sa.Index("twophase_key_idx", "key"),
        sa.Index(
            "twophase_unresolved_idx", "created_at", postgresql_where=sa.text("outcome IS NULL")
        ),
    )
    sa.Table(
        "precommits",
        metadata,
        sa.Column("txid", _KEY, primary_key=True),
        sa.Column("key", _KEY),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column(
            "state",
            sa.Text,
            nullable=False,
            comment="the first vote written for the txid: precommitted (will commit) or aborted",
        ),
        sa.Column("participants", pg.JSONB, nullable=False),
        sa.Column("result", pg.JSONB),
        sa.Column(
            "at",
            sa.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.CheckConstraint("state IN ('precommitted', 'aborted')", name="precommits_state_check"),
    )
    sa.Table(
        "outbox",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("effect_key", _KEY, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("message_id", pg.UUID, nullable=False),
        sa.Column(
            "destination",
            sa.Text,
            nullable=False,
            comment="scheme:name, e.g. nats:alerts.high or kafka:alerts",
        ),
        sa.Column("message_key", sa.Text),
        sa.Column("payload", pg.JSONB, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column(
            "created_at",
            sa.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.Column("delivered_at", sa.TIMESTAMP(timezone=True)),
        sa.Column("delivered_by", sa.Text, comment="relay identity that delivered the message"),
        sa.UniqueConstraint("message_id", name="outbox_message_id_key"),
        sa.UniqueConstraint("effect_key", "version", "seq", name="outbox_effect_seq_key"),
        sa.Index("outbox_pending_idx", "id", postgresql_where=sa.text("delivered_at IS NULL")),
    )
    sa.Table(
        "inbox",
        metadata,
        sa.Column("consumer", _KEY, primary_key=True),
        sa.Column("message_id", _KEY, primary_key=True),
        sa.Column(
            "source",
            sa.Text,
            nullable=False,
            comment="where the message was read, e.g. kafka:alerts/0@17",
        ),
        sa.Column(
            "received_at",
            sa.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
    )
    sa.Table(
        "schema_migrations",
        metadata,
        sa.Column("revision", sa.Text, primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("checksum", sa.Text, nullable=False, comment="sha256 of the migration file"),
        sa.Column("package_version", sa.Text, nullable=False),
        sa.Column(
            "applied_at",
            sa.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
    )
    return metadata
