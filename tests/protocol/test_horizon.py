"""The incremental horizon against real writers: a value drawn but not yet inserted (a BEFORE
trigger or a slow default holding it, an ORM that fetches ids first) holds the horizon back
until its transaction ends; unsafe sources are refused; the old name still works."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from eos_airflow import ConfigurationError, HorizonTimeoutError, Ledger
from eos_airflow.protocol.incremental import incremental
from tests.conftest import prepared_transactions_or_skip

#: Advisory lock key the slow writer's BEFORE trigger waits on (held by the test).
GATE = 4_004_004
SOURCE = "table:public.readings"


@pytest.fixture
def readings(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE readings (id bigserial PRIMARY KEY, value int)")
    conn.execute("CREATE TABLE readings_copy (id bigint, value int)")
    # a slow BEFORE trigger: the row's id is drawn (default) before it runs, and the
    # transaction gets its xid only when the row is written after it
    conn.execute(f"""
        CREATE FUNCTION slow_writer() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.value < 0 THEN
                PERFORM pg_advisory_lock_shared({GATE});
                PERFORM pg_advisory_unlock_shared({GATE});
            END IF;
            RETURN NEW;
        END $$""")
    conn.execute(
        "CREATE TRIGGER slow BEFORE INSERT ON readings FOR EACH ROW EXECUTE FUNCTION slow_writer()"
    )
    return conn


def incr(db: str, **options):
    options.setdefault("source_table", "readings")
    options.setdefault("column", "id")
    options.setdefault("target_table", "readings_copy")
    options.setdefault("offset_source", SOURCE)
    return lambda eos: incremental(eos, lambda: psycopg.connect(db), **options)


def add(conn: psycopg.Connection, n: int) -> None:
    conn.execute("INSERT INTO readings (value) SELECT g FROM generate_series(1, %s) AS g", [n])


def copied_ids(conn: psycopg.Connection) -> list[int]:
    return [i for (i,) in conn.execute("SELECT id FROM readings_copy ORDER BY id")]


def source_ids(conn: psycopg.Connection) -> list[int]:
    return [i for (i,) in conn.execute("SELECT id FROM readings ORDER BY id")]


def position(conn: psycopg.Connection) -> object:
    row = conn.execute("SELECT position FROM eos.offsets WHERE source = %s", [SOURCE]).fetchone()
    return row and row[0]


class SlowWriter:
    """A writer that has drawn a sequence value and holds no transaction id yet."""

    def __init__(self, db: str, control: psycopg.Connection, how: str) -> None:
        self.db, self.control, self.how = db, control, how
        self.conn = psycopg.connect(db, autocommit=(how == "trigger"))
        self.pid = self.conn.info.backend_pid
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.how == "trigger":  # INSERT draws the id, then blocks in the BEFORE trigger
            self.control.execute("SELECT pg_advisory_lock(%s)", [GATE])
            self.thread = threading.Thread(target=self._insert, daemon=True)
            self.thread.start()
            self._until("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s")
        else:  # an ORM fetching its id first, inside the transaction that inserts it later
            self.id = self.conn.execute("SELECT nextval('readings_id_seq')").fetchone()[0]
        no_xid = self.control.execute(
            "SELECT backend_xid IS NULL FROM pg_stat_activity WHERE pid = %s", [self.pid]
        ).fetchone()
        assert no_xid == (True,), "the slow writer must hold its value without an xid"

    def _insert(self) -> None:
        try:
            self.conn.execute("INSERT INTO readings (value) VALUES (-4)")
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def _until(self, query: str) -> None:
        deadline = time.monotonic() + 10
        while self.control.execute(query, [self.pid]).fetchone() != (True,):
            assert time.monotonic() < deadline, "the slow writer never reached its wait"
            time.sleep(0.01)

    def finish(self) -> None:
        if self.how == "trigger":
            self.control.execute("SELECT pg_advisory_unlock(%s)", [GATE])
            assert self.thread is not None
            self.thread.join(10)
            assert not self.thread.is_alive() and self.error is None, self.error
        else:
            self.conn.execute("INSERT INTO readings (id, value) VALUES (%s, -4)", [self.id])
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def slow_writer(db: str, readings: psycopg.Connection) -> Iterator:
    writers: list[SlowWriter] = []

    def make(how: str) -> SlowWriter:
        writers.append(SlowWriter(db, readings, how))
        return writers[-1]

    yield make
    for writer in writers:
        writer.close()


@pytest.mark.parametrize("how", ["trigger", "prefetch"])
def test_a_drawn_but_unwritten_value_holds_the_horizon_back(
    db: str, ledger: Ledger, readings, slow_writer, how
):
    """ids 1-3 committed, 4 drawn by a slow writer (no xid yet), 5 committed: no run may
    store position 5 while 4 is unseen; once 4 commits the next run copies it."""
    add(readings, 3)
    writer = slow_writer(how)
    writer.start()  # holds id 4
    add(readings, 1)  # id 5, committed
    assert source_ids(readings) == [1, 2, 3, 5]

    # a run while 4 is out: it waits for the writer, then gives up (retryable), storing nothing
    with pytest.raises(
        HorizonTimeoutError,
        match=rf"readings_id_seq up to 5 are still open "
        rf"after 0.5 s: pid {writer.pid} \(.*Nothing "
        r"was copied",
    ) as caught:
        ledger.run("run1", incr(db, horizon_timeout=0.5))
    assert caught.value.retryable
    assert position(readings) is None and copied_ids(readings) == []

    # a run that starts while 4 is out and sees the writer finish: waits, then copies 1-5
    done: dict = {}
    run = threading.Thread(
        target=lambda: done.update(out=ledger.run("run1", incr(db, horizon_timeout=30), attempt=2)),
        daemon=True,
    )
    run.start()
    time.sleep(0.5)
    assert run.is_alive() and position(readings) is None  # still waiting for the writer
    writer.finish()
    run.join(30)
    assert not run.is_alive()
    assert (done["out"]["to"], done["out"]["rows"]) == (5, 5)
    assert copied_ids(readings) == [1, 2, 3, 4, 5] and position(readings) == 5

    add(readings, 2)  # 6, 7
    assert ledger.run("run2", incr(db))["rows"] == 2
    assert copied_ids(readings) == source_ids(readings) == [1, 2, 3, 4, 5, 6, 7]


def test_a_run_without_writers_does_not_wait(db: str, ledger: Ledger, readings):
    add(readings, 100)
    started = time.monotonic()
    out = ledger.run("run1", incr(db, horizon_timeout=60))
    assert (out["to"], out["rows"]) == (100, 100)
    assert time.monotonic() - started < 5
    # a rolled-back value below the last one leaves no hole to wait for
    with psycopg.connect(db) as aborted:
        aborted.execute("INSERT INTO readings (value) VALUES (1)")  # 101
        aborted.rollback()
    add(readings, 1)  # 102
    assert ledger.run("run2", incr(db))["to"] == 102
    assert copied_ids(readings) == source_ids(readings)


def test_a_prepared_writer_is_waited_for(db: str, ledger: Ledger, readings, pg_admin_dsn):
    prepared_transactions_or_skip(pg_admin_dsn)
    add(readings, 3)
    gid = f"horizon-{db[-10:]}"
    with psycopg.connect(db) as writer:
        writer.execute("SELECT nextval('readings_id_seq')")  # 4, then the row, prepared
        writer.execute("INSERT INTO readings (id, value) VALUES (4, -4)")
        writer.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
    try:
        add(readings, 1)  # 5
        with pytest.raises(HorizonTimeoutError, match="a prepared transaction"):
            ledger.run("run1", incr(db, horizon_timeout=0.3))
        assert position(readings) is None
    finally:
        readings.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
    assert ledger.run("run1", incr(db), attempt=2)["to"] == 5
    assert copied_ids(readings) == [1, 2, 3, 4, 5]


def test_unsafe_sources_are_refused_unless_lag_is_given(db: str, ledger: Ledger, conn):
    conn.execute("CREATE SEQUENCE cached CACHE 20")
    conn.execute("CREATE TABLE by_cached (id bigint DEFAULT nextval('cached'), v int)")
    conn.execute("CREATE TABLE by_time (at timestamptz DEFAULT now(), v int)")
    conn.execute("CREATE TABLE copy_cached (id bigint, v int)")
    conn.execute("CREATE TABLE copy_time (at timestamptz, v int)")
    conn.execute("INSERT INTO by_cached (v) SELECT g FROM generate_series(1, 10) AS g")
    conn.execute("INSERT INTO by_time (at, v) VALUES (now() - interval '1 hour', 1), (now(), 2)")

    def run(key: str, table: str, column: str, **options):
        return ledger.run(
            key,
            incr(
                db,
                source_table=table,
                column=column,
                target_table=f"copy_{table[3:]}",
                offset_source=table,
                **options,
            ),
        )

    with pytest.raises(
        ConfigurationError,
        match=r"horizon='wait' cannot make the copy safe: "
        r"sequence cached behind by_cached\.id has CACHE 20.*ALTER SEQUENCE "
        r"cached CACHE 1.*Give lag=",
    ):
        run("cached", "by_cached", "id")
    with pytest.raises(
        ConfigurationError,
        match=r"by_time\.at is not filled by a sequence"
        r".*Give lag=",
    ):
        run("time", "by_time", "at")
    assert conn.execute("SELECT count(*) FROM copy_cached").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM copy_time").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM eos.offsets").fetchone() == (0,)

    # an explicit lag is the user's allowance: the copy runs, below it
    assert run("cached-lag", "by_cached", "id", lag=3)["to"] == 7
    assert run("time-lag", "by_time", "at", lag="10 minutes")["rows"] == 1
    # a CACHE 1 sequence named only by the default (not owned) is found and waited for
    conn.execute("ALTER SEQUENCE cached CACHE 1")
    assert run("cached2", "by_cached", "id")["to"] == 10
    # an identity column too
    conn.execute("CREATE TABLE by_identity (id int GENERATED ALWAYS AS IDENTITY, v int)")
    conn.execute("CREATE TABLE copy_identity (id int, v int)")
    conn.execute("INSERT INTO by_identity (v) VALUES (1), (2)")
    assert run("identity", "by_identity", "id")["to"] == 2


def test_xmin_is_a_deprecated_alias_of_wait(db: str, ledger: Ledger, readings, slow_writer):
    add(readings, 3)
    writer = slow_writer("prefetch")
    writer.start()
    add(readings, 1)
    with pytest.warns(
        DeprecationWarning, match="horizon='xmin' is deprecated and now means horizon='wait'"
    ):
        with pytest.raises(HorizonTimeoutError):
            ledger.run("run1", incr(db, horizon="xmin", horizon_timeout=0.3))
    assert position(readings) is None
    writer.finish()
    with pytest.warns(DeprecationWarning):
        assert ledger.run("run1", incr(db, horizon="xmin"), attempt=2)["to"] == 5
    assert copied_ids(readings) == [1, 2, 3, 4, 5]
    with pytest.raises(
        ConfigurationError, match="horizon='later' is not valid; choose one of 'wait', 'none'"
    ):
        ledger.run("bad", incr(db, horizon="later"))


def test_a_source_role_that_cannot_read_the_sequence_is_told_to_grant(
    db: str, ledger: Ledger, readings
):
    add(readings, 2)
    role = f"hz_reader_{db[-10:]}"
    readings.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        readings.execute(sql.SQL("GRANT SELECT ON readings TO {}").format(sql.Identifier(role)))
        as_reader = psycopg.conninfo.make_conninfo(db, user=role)
        with pytest.raises(
            ConfigurationError,
            match=rf"role '{role}' cannot read sequence "
            rf"readings_id_seq .*GRANT SELECT ON SEQUENCE readings_id_seq TO "
            rf"{role}",
        ):
            ledger.run(
                "k",
                lambda eos: incremental(
                    eos,
                    lambda: psycopg.connect(as_reader),
                    source_table="readings",
                    column="id",
                    target_table="readings_copy",
                    offset_source=SOURCE,
                ),
            )
        assert position(readings) is None and copied_ids(readings) == []
    finally:
        readings.execute(
            sql.SQL("DROP OWNED BY {}; DROP ROLE {}").format(
                sql.Identifier(role), sql.Identifier(role)
            )
        )


def test_the_operator_maps_xmin_to_wait_and_checks_its_options():
    from eos_airflow import IncrementalTableOperator

    def make(**options):
        return IncrementalTableOperator(
            task_id="t",
            source_conn_id="s",
            source_table="a",
            column="id",
            target_conn_id="c",
            target_table="b",
            **options,
        )

    assert make().horizon == "wait"
    with pytest.warns(DeprecationWarning, match="horizon='xmin' is deprecated"):
        assert make(horizon="xmin").horizon == "wait"
    with pytest.raises(ValueError, match="horizon='later' is not valid"):
        make(horizon="later")
    with pytest.raises(ValueError, match="horizon_timeout must be a number of seconds > 0"):
        make(horizon_timeout=0)
