"""The single-database protocol against a real PostgreSQL, without Airflow."""

from __future__ import annotations

import threading

import psycopg
import pytest

from eos_airflow import (
    AlreadyCommittedError,
    BadKeyError,
    ConfigurationError,
    FencedError,
    Ledger,
    LedgerSchemaError,
    Origin,
    ResultError,
    UserCodeError,
)
from eos_airflow import errors as eos_errors
from tests.conftest import events

TI = Origin("sales", "load", "manual__1", -1)


@pytest.fixture
def sales(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE sales (day text, amount int, attempt int)")
    return conn


def insert(amount: int = 10):
    def fn(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', %s, %s)", [amount, eos.attempt])
        return {"rows": 1, "attempt": eos.attempt}

    return fn


def rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT day, amount, attempt FROM sales ORDER BY attempt").fetchall()


def test_commits_once_and_skips_with_stored_result(ledger: Ledger, sales):
    first = ledger.run_outcome("sales/2024-01-01", insert(), origin=TI)
    again = ledger.run_outcome("sales/2024-01-01", insert(), attempt=2, origin=TI)
    assert (first.action, again.action) == ("committed", "skipped")
    assert again.result == first.result == {"rows": 1, "attempt": 1}
    assert rows(sales) == [("2024-01-01", 10, 1)]
    assert events(sales) == [("claimed", 1), ("committed", 1), ("skipped", 2)]
    state, attempt, version, result = sales.execute(
        "SELECT state::text, attempt, version, result FROM eos.ledger"
    ).fetchone()
    assert (state, attempt, version, result) == ("committed", 1, 1, {"rows": 1, "attempt": 1})


def test_exception_after_writes_leaves_nothing_and_next_try_writes_once(ledger: Ledger, sales):
    def half_then_fail(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', 1, %s)", [eos.attempt])
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        ledger.run("k", half_then_fail, origin=TI)
    assert rows(sales) == []
    assert sales.execute("SELECT state::text FROM eos.ledger").fetchone() == ("failed",)
    ledger.run("k", insert(), attempt=2, origin=TI)
    assert rows(sales) == [("2024-01-01", 10, 2)]
    assert events(sales) == [("claimed", 1), ("failed", 1), ("claimed", 2), ("committed", 2)]
    detail = sales.execute(
        "SELECT detail FROM eos.ledger_events WHERE event = 'failed'"
    ).fetchone()[0]
    assert detail == {"error": "RuntimeError", "message": "source went away"}


def test_failpoint_raise_after_commit_keeps_the_commit(ledger: Ledger, sales, monkeypatch):
    monkeypatch.setenv("EOS_FAILPOINTS", "after_commit@1=raise")
    with pytest.raises(eos_errors.FailpointError):
        ledger.run("k", insert(), origin=TI)
    assert ledger.run_outcome("k", insert(), attempt=2, origin=TI).action == "skipped"
    assert rows(sales) == [("2024-01-01", 10, 1)]


@pytest.mark.parametrize("step", ["after_claim", "before_commit"])
def test_failpoint_raise_before_commit_writes_nothing(ledger: Ledger, sales, monkeypatch, step):
    monkeypatch.setenv("EOS_FAILPOINTS", f"{step}@1=raise")
    with pytest.raises(eos_errors.FailpointError):
        ledger.run("k", insert(), origin=TI)
    assert rows(sales) == []
    ledger.run("k", insert(), attempt=2, origin=TI)
    assert rows(sales) == [("2024-01-01", 10, 2)]


def test_replace_supersedes_atomically_with_version_increment(ledger: Ledger, sales):
    ledger.run("day", insert(10), origin=TI)
    seen = {}

    def reload(eos):
        seen["previous"] = eos.previous
        eos.conn.execute("DELETE FROM sales WHERE day = '2024-01-01'")
        eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', 20, %s)", [eos.attempt])
        return {"version_replaced": eos.previous.version}

    out = ledger.run_outcome(
        "day",
        reload,
        attempt=1,
        on_committed="replace",
        origin=Origin("sales", "load", "backfill__2", -1),
    )
    assert (out.action, out.version) == ("replaced", 2)
    assert seen["previous"].result == {"rows": 1, "attempt": 1}
    assert seen["previous"].version == 1
    assert rows(sales) == [("2024-01-01", 20, 1)]
    assert [e for e, _ in events(sales)] == ["claimed", "committed", "claimed", "replaced"]


def test_failed_replace_keeps_the_previous_version(ledger: Ledger, sales):
    ledger.run("day", insert(10), origin=TI)

    def broken(eos):
        eos.conn.execute("DELETE FROM sales")
        raise ValueError("bad input file")

    with pytest.raises(ValueError):
        ledger.run("day", broken, on_committed="replace", origin=TI, attempt=2)
    assert rows(sales) == [("2024-01-01", 10, 1)]
    state, version = sales.execute("SELECT state::text, version FROM eos.ledger").fetchone()
    assert (state, version) == ("committed", 1)
    assert ledger.run_outcome("day", insert(), attempt=3, origin=TI).action == "skipped"


def test_on_committed_fail_raises_and_writes_nothing(ledger: Ledger, sales):
    ledger.run("k", insert(), origin=TI)
    with pytest.raises(AlreadyCommittedError, match="on_committed='fail'"):
        ledger.run("k", insert(), attempt=2, on_committed="fail", origin=TI)
    assert len(rows(sales)) == 1


def test_fenced_when_newer_try_claims_during_run(ledger: Ledger, sales):
    """Try 1 is in its user code (a zombie) when try 2 claims: only try 2 can commit."""
    in_run, release = threading.Event(), threading.Event()
    outcome = {}

    def slow(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('zombie', 1, %s)", [eos.attempt])
        in_run.set()
        assert release.wait(10)
        return {"attempt": eos.attempt}

    def zombie():
        try:
            ledger.run("k", slow, attempt=1, origin=TI)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome["zombie"] = exc

    thread = threading.Thread(target=zombie)
    thread.start()
    assert in_run.wait(10)
    assert ledger.run("k", insert(), attempt=2, origin=TI) == {"rows": 1, "attempt": 2}
    release.set()
    thread.join(10)
    assert isinstance(outcome["zombie"], FencedError)
    assert "do not retry" in str(outcome["zombie"])
    assert rows(sales) == [("2024-01-01", 10, 2)]
    assert events(sales) == [("claimed", 1), ("claimed", 2), ("committed", 2), ("fenced", 1)]


def test_lower_try_arriving_late_is_fenced_at_claim(ledger: Ledger, sales):
    hold = threading.Event()
    started = threading.Event()

    def owner():
        def fn(eos):
            started.set()
            hold.wait(10)
            return None

        ledger.run("k", fn, attempt=3, origin=TI)

    thread = threading.Thread(target=owner)
    thread.start()
    assert started.wait(10)
    try:
        with pytest.raises(FencedError, match="try 3 of this task instance owns it"):
            ledger.run("k", insert(), attempt=2, origin=TI)
    finally:
        hold.set()
        thread.join(10)
    assert rows(sales) == []


def test_missing_schema_is_a_clear_error_and_writes_nothing(empty_db: str):
    with (
        Ledger(empty_db) as ledger,
        pytest.raises(LedgerSchemaError, match="eos-airflow db migrate"),
    ):
        ledger.run("k", lambda eos: None)
    with psycopg.connect(empty_db) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'eos'"
        ).fetchone() == (0,)


def test_non_json_result_rolls_back_before_commit(ledger: Ledger, sales):
    def returns_object(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('x', 1, 1)")
        return {"when": object()}

    with pytest.raises(ResultError, match="the result must be JSON"):
        ledger.run("k", returns_object, origin=TI)
    assert rows(sales) == []
    assert sales.execute("SELECT state::text FROM eos.ledger").fetchone() == ("failed",)


def test_oversized_result_is_refused(db: str, sales):
    with (
        Ledger(db, max_result_bytes=100) as ledger,
        pytest.raises(ResultError, match="limit is 100"),
    ):
        ledger.run("k", lambda eos: "x" * 200)


def test_missing_target_table_names_the_fix(ledger: Ledger, conn):
    with pytest.raises(UserCodeError, match="Create the table") as info:
        ledger.run("k", lambda eos: eos.conn.execute("INSERT INTO nowhere VALUES (1)"))
    assert not info.value.retryable
    assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)


@pytest.mark.parametrize(
    "key,message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a\nb", "control character"),
        ("x" * 1001, "limit is 1000"),
        (42, "must be a string"),
    ],
)
def test_bad_keys_are_refused_before_anything_is_written(ledger: Ledger, conn, key, message):
    with pytest.raises(BadKeyError, match=message):
        ledger.run(key, lambda eos: None)
    assert conn.execute("SELECT count(*) FROM eos.ledger").fetchone() == (0,)


def test_unknown_on_committed_lists_the_choices(ledger: Ledger):
    with pytest.raises(ConfigurationError, match="skip, replace, fail"):
        ledger.run("k", lambda eos: None, on_committed="ignore")


def test_keys_are_stored_as_given(ledger: Ledger, conn):
    key = "sales/2024-01-01 ünïcode 'quoted' %s {{x}}"
    ledger.run(key, lambda eos: 1)
    assert conn.execute("SELECT key FROM eos.ledger").fetchone() == (key,)


def test_connection_is_reused_between_effects(ledger: Ledger, sales):
    for i in range(5):
        ledger.run(f"k{i}", insert())
    assert sales.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'eos-airflow' "
        "AND datname = current_database()"
    ).fetchone() == (1,)


def test_claim_commits_before_the_function_runs_in_its_own_transaction(ledger: Ledger, sales):
    """The claim and the effect's BEGIN share one round trip, but not one transaction: other
    sessions see the claim while the function runs, and none of the function's writes."""
    seen = {}

    def fn(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', 1, 1)")
        with psycopg.connect(sales.info.dsn, autocommit=True) as other:
            seen["ledger"] = other.execute(
                "SELECT state::text, attempt, owner IS NOT NULL FROM eos.ledger"
            ).fetchone()
            seen["events"] = events(other)
            seen["sales"] = other.execute("SELECT count(*) FROM sales").fetchone()[0]
        seen["status"] = eos.conn.info.transaction_status
        return None

    ledger.run("k", fn, origin=TI)
    assert seen == {
        "ledger": ("running", 1, True),
        "events": [("claimed", 1)],
        "sales": 0,
        "status": psycopg.pq.TransactionStatus.INTRANS,
    }
    assert rows(sales) == [("2024-01-01", 1, 1)]


def test_every_claim_outcome_leaves_the_pooled_connection_idle(ledger: Ledger, sales):
    ledger.run("k", insert(), origin=TI)
    ledger.run("k", insert(), attempt=2, origin=TI)  # skipped
    with pytest.raises(AlreadyCommittedError):
        ledger.run("k", insert(), attempt=3, on_committed="fail", origin=TI)
    with pytest.raises(UserCodeError):
        ledger.run("k2", lambda eos: eos.conn.execute("SELECT 1/0"), origin=TI)
    conn = ledger.connection()
    try:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        ledger.putconn(conn)
    assert sales.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'eos-airflow' "
        "AND datname = current_database()"
    ).fetchone() == (1,)
    assert rows(sales) == [("2024-01-01", 10, 1)]


def _prepared(conn) -> list[str]:
    return [
        name
        for (name,) in conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE 'eos\\_%' ORDER BY name"
        )
    ]


def test_a_connection_prepares_the_ledger_calls_at_its_second_effect(ledger: Ledger, sales):
    """The first effect on a connection sends the claim and commit calls as plain statements;
    the second prepares them in its claim's round trip; later effects only execute them."""
    seen = []

    def fn(eos):
        seen.append(_prepared(eos.conn))
        eos.conn.execute("INSERT INTO sales VALUES ('2024-01-01', 1, %s)", [len(seen)])

    for i in range(4):
        ledger.run(f"k{i}", fn, origin=TI)
    from eos_airflow.ledger.queries import prepared_names

    assert seen[0] == []
    assert seen[1:] == [sorted(prepared_names("eos"))] * 3
    assert len(rows(sales)) == 4
    assert [e for e, _ in events(sales)] == ["claimed", "committed"] * 4


def test_prepared_statements_dropped_between_effects_are_prepared_again(ledger: Ledger, sales):
    for i in range(2):
        ledger.run(f"k{i}", insert(), origin=TI)
    conn = ledger.connection()
    conn.execute("DEALLOCATE ALL")
    ledger.putconn(conn)
    assert ledger.run_outcome("k2", insert(), origin=TI).action == "committed"
    conn = ledger.connection()
    try:
        assert len(_prepared(conn)) == 2
        # a leftover of the same name (e.g. from a failed message) does not block either
        conn.execute("DEALLOCATE ALL")
        from eos_airflow.ledger import store
        from eos_airflow.ledger.queries import prepared_names

        # the store believes its statements are still to be prepared, and one name is taken
        store._hot_paths[conn]["eos"] = store.HotPath.PLAIN
        conn.execute(f"PREPARE {prepared_names('eos')[0]} AS SELECT 1")
    finally:
        ledger.putconn(conn)
    assert ledger.run_outcome("k3", insert(), origin=TI).action == "committed"
    assert len(rows(sales)) == 4


def test_a_function_that_drops_prepared_statements_fails_cleanly_then_works(ledger: Ledger, sales):
    for i in range(2):
        ledger.run(f"k{i}", insert(), origin=TI)

    def discard(eos):
        eos.conn.execute("INSERT INTO sales VALUES ('2024-01-02', 5, %s)", [eos.attempt])
        eos.conn.execute("DEALLOCATE ALL")
        return {"ok": True}

    with pytest.raises(UserCodeError, match="dropped this session's prepared statements") as err:
        ledger.run("k2", discard, origin=TI)
    assert err.value.retryable
    assert sales.execute("SELECT count(*) FROM sales WHERE day = '2024-01-02'").fetchone() == (0,)
    assert ledger.run("k2", discard, attempt=2, origin=TI) == {"ok": True}
    assert ledger.run("k3", discard, origin=TI) == {"ok": True}
    assert sales.execute(
        "SELECT attempt FROM sales WHERE day = '2024-01-02' ORDER BY attempt"
    ).fetchall() == [(1,), (2,)]
    assert [e for e, _ in events(sales, "k2")] == ["claimed", "failed", "claimed", "committed"]
