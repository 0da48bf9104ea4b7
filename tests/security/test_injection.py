"""Hostile names and keys land exactly where they are meant to, and nowhere else.

Identifiers (the ledger's schema, a transfer's target table) reach SQL only through
``psycopg.sql.Identifier``; keys only as parameters. Hypothesis draws names and keys with
quotes, semicolons, comment markers, spaces, unicode, ``%`` and ``{}`` (the characters that
break string-built SQL, ``%``-style parameters and ``str.format`` templates such as our
``{schema}`` placeholder). For each one: the object with exactly that name holds the data,
the stored key equals the given key, and the catalog is otherwise unchanged (nothing created
or dropped).
"""

from __future__ import annotations

import json
import string
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg import sql

from eos_airflow import ConfigurationError, Ledger
from eos_airflow.ledger.chain import verify
from eos_airflow.ledger.queries import render
from eos_airflow.protocol.transfer import transfer
from tests.security.conftest import catalog, cli

#: Pieces of SQL and template syntax that string-built statements would execute or expand.
HOSTILE = [
    "'",
    '"',
    ";",
    "--",
    "/*",
    "*/",
    "%",
    "%s",
    "%(key)s",
    "{}",
    "{schema}",
    "\\",
    "$$",
    " ",
    "é",
    "✓",
    "名",
    "🙂",
    "DROP TABLE target",
    "'); DELETE FROM eos.ledger; --",
    '" CASCADE; DROP SCHEMA public; --',
    "E'\\x41'",
    "::text",
    "(",
    ")",
    "..",
]
text = st.lists(
    st.one_of(
        st.sampled_from(HOSTILE), st.text(string.printable.strip() + "éß名", min_size=1, max_size=4)
    ),
    min_size=1,
    max_size=6,
).map("".join)
#: A PostgreSQL name: at most 63 bytes, no NUL; transfer's table names have no dots.
name = text.filter(lambda s: 0 < len(s.encode()) <= 63 and s.strip() and "\x00" not in s)
table_name = name.filter(lambda s: "." not in s)
key = text.filter(lambda s: s.strip() and not any(ord(c) < 32 or ord(c) == 127 for c in s))

FAST = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def target(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE target (key text, n int)")
    return db


@FAST
@given(k=key)
@example(k="'); DROP TABLE target; --")
@example(k="%(key)s {schema} %s")
def test_keys_are_stored_exactly_as_given(target, k):
    before = catalog(target)
    with Ledger(target) as ledger:

        def fn(eos):
            eos.conn.execute("INSERT INTO target VALUES (%s, 1)", [eos.key])
            return {"key": eos.key}

        assert ledger.run(k, fn) == {"key": k}
        assert ledger.run(k, fn, attempt=2) == {"key": k}  # skipped: found by that key
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT key, n FROM target WHERE key = %s", [k]).fetchall() == [(k, 1)]
        assert conn.execute(
            "SELECT state::text, result FROM eos.ledger WHERE key = %s", [k]
        ).fetchone() == ("committed", {"key": k})
        assert [
            e
            for (e,) in conn.execute(
                "SELECT event::text FROM eos.ledger_events WHERE key = %s ORDER BY seq", [k]
            )
        ] == ["claimed", "committed", "skipped"]
    assert catalog(target) == before


def test_hostile_keys_through_the_cli(target):
    keys = ["'); DROP TABLE target; --", "%s %(key)s {schema}", 'quote " and \\ back', "名 🙂"]
    with Ledger(target) as ledger:
        for k in keys:
            ledger.run(k, lambda eos: {"k": eos.key})
    before = catalog(target)
    for k in keys:
        shown = cli("ledger", "show", k, "--dsn", target, "--format", "json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["entry"]["key"] == k
    listed = cli("ledger", "list", "--dsn", target, "--format", "json", "--prefix", "'); DROP")
    assert [json.loads(row)["key"] for row in listed.stdout.splitlines()] == [keys[0]]
    exported = cli("ledger", "export", "--dsn", target, "--format", "json")
    assert {json.loads(line)["key"] for line in exported.stdout.splitlines()} == set(keys)
    assert cli("ledger", "verify", "--dsn", target).returncode == 0
    assert catalog(target) == before


@settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    schema=st.from_regex(r"[a-z_][a-z0-9_]{0,40}", fullmatch=True).filter(
        lambda s: not s.startswith("pg_") and s not in ("public", "information_schema")
    )
)
@example(schema="eos_ledger_2")
@example(schema="_")
def test_a_ledger_schema_lands_in_exactly_that_schema(empty_db, schema):
    before = catalog(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS target (key text, n int)")
    with Ledger(empty_db, schema=schema) as ledger:
        ledger.migrate()
        assert ledger.run("k'; --", lambda eos: {"n": 1}) == {"n": 1}
        chunked = ledger.run(
            "chunked", lambda eos: sum(len(c) for c in eos.checkpoints(range(5), every=2))
        )
        assert chunked == 5
    with psycopg.connect(empty_db) as conn:
        schemas = [
            n
            for (n,) in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname NOT IN "
                "('information_schema', 'public')"
            )
        ]
        assert schemas == [schema]
        assert conn.execute(
            sql.SQL("SELECT key, state::text FROM {} ORDER BY key").format(
                sql.Identifier(schema, "ledger")
            )
        ).fetchall() == [("chunked", "committed"), ("k'; --", "committed")]
        assert verify(conn, schema).ok
    assert cli("ledger", "verify", "--dsn", empty_db, "--schema", schema).returncode == 0
    shown = cli(
        "ledger", "show", "k'; --", "--dsn", empty_db, "--schema", schema, "--format", "json"
    )
    assert shown.returncode == 0 and json.loads(shown.stdout)["entry"]["state"] == "committed"
    # everything new is inside that schema (plus the test's own table)
    added = catalog(empty_db, skip_schema=schema) - before
    assert {(s, n) for s, n, _ in added} <= {
        ("public", "target"),
        ("public", "_target"),
        ("public", "target_pkey"),
    }
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


#: Schema names that are not plain lowercase identifiers; `$$` would end the dollar-quoted
#: function bodies the migrations write the schema into.
REFUSED_SCHEMAS = [
    "x$$; DROP SCHEMA public CASCADE; $$",
    "eos$$",
    "Eos",
    "EOS",
    'e"os',
    "e'os",
    "e os",
    "1eos",
    "eos-ledger",
    "eos.ledger",
    "é",
    "eos;",
    "%s",
    "{schema}",
]


@pytest.mark.parametrize("schema", REFUSED_SCHEMAS)
def test_a_schema_that_is_not_a_plain_identifier_is_refused_everywhere(empty_db, schema):
    from eos_airflow.ledger.migrate import migrate

    before = catalog(empty_db)
    allowed = (
        r"is not allowed: a ledger schema must be a plain lowercase identifier "
        r"\(a-z or _ first, then a-z, 0-9 or _; at most 63 characters\)"
    )
    with pytest.raises(ConfigurationError, match=allowed):
        Ledger(empty_db, schema=schema)
    with pytest.raises(ConfigurationError, match=allowed):
        migrate(empty_db, schema)
    for command in (["db", "migrate"], ["ledger", "verify"], ["ledger", "list"]):
        done = cli(*command, "--dsn", empty_db, "--schema", schema)
        assert (
            done.returncode == 2
            and "is not allowed: a ledger schema must be a plain lowercase identifier"
            in done.stderr
        ), (command, done)
    with pytest.raises(ConfigurationError, match=allowed):
        render("SELECT 1 FROM {schema}.ledger", schema)
    assert catalog(empty_db) == before  # nothing was created


def test_operators_and_sensors_refuse_such_a_schema_when_the_dag_is_parsed():
    from eos_airflow import (
        ExactlyOnceSQLOperator,
        IncrementalTableOperator,
        LedgerSensor,
        OutboxRelayOperator,
    )

    allowed = "is not allowed: a ledger schema must be a plain lowercase identifier"
    made = [
        lambda: ExactlyOnceSQLOperator(
            task_id="t", conn_id="c", sql="SELECT 1", ledger_schema="x$$"
        ),
        lambda: IncrementalTableOperator(
            task_id="t",
            source_conn_id="s",
            source_table="a",
            column="id",
            target_conn_id="c",
            target_table="b",
            ledger_schema="Eos",
        ),
        lambda: LedgerSensor(task_id="t", conn_id="c", key="k", ledger_schema='e"os'),
        lambda: OutboxRelayOperator(
            task_id="t", conn_id="c", nats_url="nats://h:4222", ledger_schema="eos;"
        ),
    ]
    for make in made:
        with pytest.raises(ConfigurationError, match=allowed):
            make()


def test_a_schema_name_postgresql_would_cut_is_refused(empty_db):
    long = "s" * 64
    with pytest.raises(
        ConfigurationError,
        match="is 64 bytes; PostgreSQL names are at most 63 bytes: choose a shorter schema name",
    ):
        Ledger(empty_db, schema=long)
    with psycopg.connect(empty_db) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'sss%'"
        ).fetchone() == (0,)


@FAST
@given(
    table=table_name,
    chunk_rows=st.sampled_from([None, 2]),
    mode=st.sampled_from(["append", "replace"]),
)
@example(table='t"; DROP TABLE decoy; --', chunk_rows=2, mode="replace")
@example(table="%s {} {schema} 名", chunk_rows=None, mode="append")
def test_transfer_writes_exactly_the_named_table(db, table, chunk_rows, mode):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        conn.execute(sql.SQL("CREATE TABLE {} (n int, v text)").format(sql.Identifier(table)))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (-1, 'old')").format(sql.Identifier(table)))
        conn.execute("CREATE TABLE IF NOT EXISTS decoy (n int, v text)")
    before = catalog(db)

    def source() -> psycopg.Connection:
        return psycopg.connect(db, autocommit=True)

    key = f"copy/{table}/{uuid.uuid4()}"  # hypothesis may draw the same example twice
    with Ledger(db) as ledger:
        done = ledger.run(
            key,
            lambda eos: transfer(
                eos,
                source,
                query="SELECT g, 'v''' || g FROM generate_series(1, 5) g ORDER BY g",
                table=table,
                mode=mode,
                chunk_rows=chunk_rows,
            ),
        )
    assert done["rows"] == 5 and done["table"] == table
    assert catalog(db) == before, "a staging table or other object was left behind"
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT n, v FROM {} ORDER BY n").format(sql.Identifier(table))
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM decoy").fetchone() == (0,)
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
    kept = [(-1, "old")] if mode == "append" else []
    assert rows == kept + [(n, f"v'{n}") for n in range(1, 6)]
