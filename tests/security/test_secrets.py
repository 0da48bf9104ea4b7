"""A database password never shows: not in logs, error messages, ledger events, exports, CLI
output, nor the two-phase decision log.

The tests run their own PostgreSQL with password authentication (scram-sha-256 on TCP; the
shared test server trusts everyone, so a wrong password would pass there), and pass the
password the ways users do: in a DSN, in an Airflow connection (``AIRFLOW_CONN_*`` JSON), and
in ``eos-airflow recover --participant NAME=DSN``. Every output is searched for the password
(and for the wrong one tried).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from eos_airflow import ConfigurationError, EosError, Ledger, Origin
from eos_airflow.multiledger import MultiLedger
from tests.faults.server import LocalServer
from tests.security.conftest import cli

PASSWORD = f"Pw-{uuid.uuid4().hex[:12]}"
WRONG = f"Wr-{uuid.uuid4().hex[:12]}"
USER = "eos_app"


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    own = LocalServer(
        {"password_encryption": "'scram-sha-256'", "max_prepared_transactions": "8"}
    ).init()
    (own.pgdata / "pg_hba.conf").write_text(
        "local all all trust\n"
        "host all postgres 127.0.0.1/32 trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    own.start()
    with psycopg.connect(own.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(USER), sql.Literal(PASSWORD)
            )
        )
    try:
        yield own
    finally:
        own.destroy()


@pytest.fixture
def dbs(server: LocalServer) -> dict[str, str]:
    """Two migrated databases, as DSNs that carry the password."""
    token = uuid.uuid4().hex[:8]
    out = {}
    for name in ("a", "b"):
        server.create_database(f"sec_{name}_{token}")
        out[name] = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{server.port}/sec_{name}_{token}"
        with Ledger(out[name]) as ledger:
            ledger.migrate()
    return out


def assert_hidden(*texts: object) -> None:
    for text in texts:
        shown = str(text)
        assert PASSWORD not in shown, f"the password leaked: {shown[:2000]}"
        assert WRONG not in shown, f"the wrong password leaked: {shown[:2000]}"


def test_passwords_stay_out_of_errors_events_exports_and_logs(dbs, caplog):
    caplog.set_level(logging.DEBUG)
    dsn = dbs["a"]
    wrong = dsn.replace(PASSWORD, WRONG)
    with Ledger(wrong) as ledger:  # a bad password
        with pytest.raises(EosError) as raised:
            ledger.run("k", lambda eos: 1)
    assert "password authentication failed" in str(raised.value)
    assert_hidden(raised.value, repr(raised.value), raised.value.__cause__)

    for malformed in (
        dsn.replace(PASSWORD, PASSWORD + "%ZZ"),  # bad percent-encoding
        f"host=127.0.0.1 password={PASSWORD} {PASSWORD}x",
    ):  # a stray word
        with pytest.raises(ConfigurationError, match="not a PostgreSQL connection string") as bad:
            Ledger(malformed)
        assert_hidden(bad.value)

    def fails(eos):
        eos.conn.execute("INSERT INTO nowhere VALUES (1)")

    with Ledger(dsn) as ledger:
        ledger.run("ok", lambda eos: {"n": 1}, origin=Origin("d", "t", "r", -1))
        with pytest.raises(EosError) as failed:
            ledger.run("bad", fails)
        assert_hidden(failed.value)
        with pytest.raises(EosError) as refused:  # committed already, on_committed="fail"
            ledger.run("ok", lambda eos: 2, origin=Origin("d", "t", "r", -1), on_committed="fail")
        assert_hidden(refused.value)

    outputs = []
    for argv in (
        ("ledger", "list"),
        ("ledger", "show", "ok"),
        ("ledger", "show", "bad"),
        ("ledger", "export"),
        ("ledger", "export", "--format", "csv"),
        ("ledger", "verify"),
        ("ledger", "stats"),
        ("doctor",),
        ("recover",),
        ("doctor", "--format", "json"),
    ):
        done = cli(*argv, "--dsn", dsn)
        outputs.append(done)
        assert_hidden(done.stdout, done.stderr)
    assert all(o.returncode == 0 for o in outputs[:3]), [o.stderr for o in outputs[:3]]
    assert "ok" in outputs[3].stdout  # the export holds the events
    for argv in (("ledger", "list"), ("doctor",), ("ledger", "export")):
        done = cli(*argv, "--dsn", wrong)
        assert done.returncode != 0 and "password authentication failed" in done.stderr
        assert_hidden(done.stdout, done.stderr)
    bad_uri = cli("ledger", "list", "--dsn", dsn.replace(PASSWORD, PASSWORD + "%ZZ"))
    assert bad_uri.returncode == 2 and "not a PostgreSQL connection string" in bad_uri.stderr
    assert_hidden(bad_uri.stderr)

    with psycopg.connect(dsn) as conn:
        assert_hidden(
            conn.execute("SELECT json_agg(e)::text FROM eos.ledger_events e").fetchone()[0],
            conn.execute("SELECT json_agg(l)::text FROM eos.ledger l").fetchone()[0],
        )
    assert_hidden(caplog.text)


def test_the_decision_log_and_recover_keep_only_connection_ids(dbs, caplog):
    caplog.set_level(logging.DEBUG)
    with MultiLedger(
        dbs["a"], {"a": dbs["a"], "b": dbs["b"]}, conn_ids={"a": "bank_a", "b": "bank_b"}
    ) as banks:
        assert banks.run("move/1", lambda eos: {"moved": 1}) == {"moved": 1}
    with psycopg.connect(dbs["a"]) as conn:
        tables = [
            t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'eos'")
        ]
        for table in tables:
            dump = conn.execute(
                sql.SQL("SELECT coalesce(json_agg(t)::text, '') FROM {} t").format(
                    sql.Identifier("eos", table)
                )
            ).fetchone()[0]
            assert_hidden(dump)
        log = conn.execute("SELECT json_agg(t)::text FROM eos.twophase t").fetchone()[0]
    assert "bank_a" in log and "bank_b" in log  # the ids are there; the secrets are not
    down = dbs["b"].replace(dbs["b"].split("@")[1].split("/")[0], "127.0.0.1:1")
    for participant in (
        f"b={down}",
        f"b={dbs['b'].replace(PASSWORD, PASSWORD + '%ZZ')}",
        dbs["b"],
    ):  # unreachable, malformed, not NAME=DSN
        done = cli(
            "recover",
            "--dsn",
            dbs["a"],
            "--grace",
            "0",
            "--participant",
            f"a={dbs['a']}",
            "--participant",
            participant,
        )
        assert_hidden(done.stdout, done.stderr)
    assert_hidden(caplog.text)


def test_an_airflow_connection_password_stays_hidden(dbs, monkeypatch):
    """Through ``--conn-id`` (the Postgres hook reads AIRFLOW_CONN_*), right and wrong
    passwords."""
    params = psycopg.conninfo.conninfo_to_dict(dbs["a"])
    conn = {
        "conn_type": "postgres",
        "host": params["host"],
        "port": int(params["port"]),
        "login": USER,
        "password": PASSWORD,
        "schema": params["dbname"],
    }
    monkeypatch.setenv("AIRFLOW_CONN_SEC_OK", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW_CONN_SEC_BAD", json.dumps({**conn, "password": WRONG}))
    for conn_id, argv in (
        ("SEC_OK", ("ledger", "export")),
        ("SEC_OK", ("doctor",)),
        ("SEC_BAD", ("ledger", "list")),
        ("SEC_BAD", ("doctor",)),
    ):
        done = cli(*argv, "--conn-id", conn_id)
        assert_hidden(done.stdout, done.stderr)
        if conn_id == "SEC_BAD":
            assert done.returncode != 0 and "password authentication failed" in done.stderr
        else:
            assert done.returncode in (0, 1), done.stderr
