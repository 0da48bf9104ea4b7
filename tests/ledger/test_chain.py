"""The events' hash chain: real effects verify; any edit, deletion, forgery or reordering of
events (by a superuser who bypasses the append-only trigger) is found and located."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eos_airflow import AlreadyCommittedError, FencedError, Ledger, Origin
from eos_airflow.ledger import chain
from eos_airflow.ledger.tables import EVENT_KINDS
from tests.conftest import create_database, drop_database, events

TI = Origin("sales", "load", "manual__1", -1)
BACKFILL = Origin("sales", "load", "backfill__2", -1)
A, B, C = "sales/2024-01-01", "sales/2024-01-02", "orders/ключ ☃"


class Boom(Exception):
    pass


def ok(value: object = 1) -> Callable:
    return lambda eos: {"value": value, "attempt": eos.attempt}


def boom(eos) -> None:
    eos.conn.execute("SELECT 1")
    raise Boom('source "gone"\n\ttab, ünïcode, \x1f unit separator')


def build_ledger(ledger: Ledger) -> None:
    """Commits, skips, a refusal, failures, a replace and a failed replace over three keys."""
    ledger.run(A, ok(), origin=TI)  # claimed, committed
    ledger.run(A, ok(), attempt=2, origin=TI)  # skipped
    ledger.run(A, ok(2), on_committed="replace", origin=BACKFILL)  # claimed, replaced
    with pytest.raises(Boom):
        ledger.run(B, boom, origin=TI)  # claimed, failed
    ledger.run(B, ok(), attempt=2, origin=TI)  # claimed, committed
    ledger.run(C, ok())  # claimed, committed
    with pytest.raises(AlreadyCommittedError):
        ledger.run(C, ok(), on_committed="fail")  # skipped
    with pytest.raises(Boom):
        ledger.run(C, boom, on_committed="replace")  # claimed, failed


@dataclass(frozen=True)
class Event:
    id: int
    key: str
    seq: int
    event: str


def chain_of(conn: psycopg.Connection, key: str) -> list[Event]:
    return [
        Event(*row)
        for row in conn.execute(
            "SELECT id, key, seq, event::text FROM eos.ledger_events WHERE key = %s ORDER BY seq",
            [key],
        )
    ]


@contextlib.contextmanager
def tampering(conn: psycopg.Connection, how: str = "replica") -> Iterator[None]:
    """A superuser's transaction that bypasses the append-only trigger; always rolled back."""
    with conn.transaction(force_rollback=True):
        if how == "replica":
            conn.execute("SET LOCAL session_replication_role = replica")
        else:
            conn.execute("ALTER TABLE eos.ledger_events DISABLE TRIGGER ledger_events_append_only")
        yield


def where(problem: chain.Problem | None) -> tuple[str, int | None, int | None]:
    assert problem is not None
    return problem.key, problem.seq, problem.event_id


# --- tampering operations: each returns where verify must report the first problem ---------


def edit(conn: psycopg.Connection, ev: Event, assignment: str) -> None:
    conn.execute(f"UPDATE eos.ledger_events SET {assignment} WHERE id = %s", [ev.id])  # noqa: S608


def edit_detail(conn, ev: Event, chains) -> tuple:
    edit(conn, ev, """detail = detail || '{"amount": 0}'""")
    return ev.key, ev.seq, ev.id


def edit_at(conn, ev: Event, chains) -> tuple:
    edit(conn, ev, "at = at + interval '1 microsecond'")
    return ev.key, ev.seq, ev.id


def edit_attempt(conn, ev: Event, chains) -> tuple:
    edit(conn, ev, "attempt = attempt + 1")
    return ev.key, ev.seq, ev.id


def edit_kind(conn, ev: Event, chains, kind: str | None = None) -> tuple:
    kind = kind or ("committed" if ev.event != "committed" else "replaced")
    assert kind != ev.event
    conn.execute("UPDATE eos.ledger_events SET event = %s WHERE id = %s", [kind, ev.id])
    return ev.key, ev.seq, ev.id


def delete(conn, ev: Event, chains) -> tuple:
    conn.execute("DELETE FROM eos.ledger_events WHERE id = %s", [ev.id])
    rest = chains[ev.key]
    if ev.seq == len(rest):  # the newest: only the ledger row's head shows it
        return ev.key, ev.seq, None
    after = rest[ev.seq]  # event seq + 1 is where event seq was expected
    return ev.key, after.seq, after.id


def swap(conn, first: Event, second: Event) -> tuple:
    """Exchange the seq numbers of two events of one key (the unique key forbids a one-step swap)."""
    assert first.key == second.key and first.seq < second.seq
    conn.execute(
        "UPDATE eos.ledger_events SET seq = -seq WHERE id IN (%s, %s)", [first.id, second.id]
    )
    conn.execute("UPDATE eos.ledger_events SET seq = %s WHERE id = %s", [second.seq, first.id])
    conn.execute("UPDATE eos.ledger_events SET seq = %s WHERE id = %s", [first.seq, second.id])
    return first.key, first.seq, second.id


FORGE = """
    INSERT INTO eos.ledger_events (key, seq, event, attempt, at, detail, prev_hash, hash)
    SELECT k, s, 'committed', 1, now(), '{}', p,
           eos.event_hash(p, k, s, 'committed', 1, now(), '{}')
    FROM (SELECT %(key)s::text AS k, %(seq)s::bigint AS s,
                 (SELECT hash FROM eos.ledger_events WHERE key = %(key)s AND seq = %(seq)s - 1)
                 AS p) AS forged
"""


def forge_in_middle(conn, key: str, seq: int, chains) -> tuple:
    """Shift events seq.. up by one and insert a well-hashed forged event as number seq."""
    conn.execute(
        "UPDATE eos.ledger_events SET seq = -seq - 1 WHERE key = %s AND seq >= %s", [key, seq]
    )
    conn.execute("UPDATE eos.ledger_events SET seq = -seq WHERE key = %s AND seq < 0", [key])
    conn.execute(FORGE, {"key": key, "seq": seq})
    displaced = chains[key][seq - 1]
    return key, seq + 1, displaced.id


def forge_at_end(conn, key: str, chains) -> tuple:
    """Append a well-hashed event without moving the ledger row's head."""
    last = len(chains[key])
    conn.execute(FORGE, {"key": key, "seq": last + 1})
    return key, last, None


def delete_key_events(conn, key: str, chains) -> tuple:
    conn.execute("DELETE FROM eos.ledger_events WHERE key = %s", [key])
    return key, len(chains[key]), None


# --- a fixed ledger -------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(admin_dsn: str, template: str) -> Iterator[str]:
    name = f"eos_c_{uuid.uuid4().hex[:10]}"
    try:
        yield create_database(admin_dsn, name, template=template)
    finally:
        drop_database(admin_dsn, name)


@pytest.fixture(scope="module")
def built_db(pg_admin_dsn: str, template_db: str) -> Iterator[tuple[str, dict[str, list[Event]]]]:
    """One ledger for the module; the tests below tamper only in rolled-back transactions."""
    with fresh_database(pg_admin_dsn, template_db) as dsn:
        with Ledger(dsn) as ledger:
            build_ledger(ledger)
        with psycopg.connect(dsn) as conn:
            yield dsn, {key: chain_of(conn, key) for key in (A, B, C)}


@pytest.fixture
def built(built_db) -> dict[str, list[Event]]:
    return built_db[1]


@pytest.fixture
def bconn(built_db) -> Iterator[psycopg.Connection]:
    with psycopg.connect(built_db[0], autocommit=True) as conn:
        yield conn


def test_real_effects_verify_and_every_event_is_counted(built, bconn: psycopg.Connection):
    assert [e.event for e in built[A]] == ["claimed", "committed", "skipped", "claimed", "replaced"]
    assert events(bconn, B) == [("claimed", 1), ("failed", 1), ("claimed", 2), ("committed", 2)]
    assert [e.event for e in built[C]] == ["claimed", "committed", "skipped", "claimed", "failed"]
    failure = bconn.execute(
        "SELECT detail->>'message' FROM eos.ledger_events WHERE key = %s AND event = 'failed'", [C]
    ).fetchone()[0]
    assert "\x1f unit separator" in failure
    result = chain.verify(bconn)
    assert result.ok, result.problems
    assert (result.events, result.keys, result.first_problem) == (14, 3, None)
    heads = bconn.execute("SELECT key, event_seq FROM eos.ledger ORDER BY key").fetchall()
    assert heads == [(C, 5), (A, 5), (B, 4)]


CASES: dict[str, Callable] = {
    "edit detail": lambda conn, ch: edit_detail(conn, ch[B][1], ch),
    "edit at": lambda conn, ch: edit_at(conn, ch[A][2], ch),
    "edit attempt": lambda conn, ch: edit_attempt(conn, ch[C][3], ch),
    "edit event kind": lambda conn, ch: edit_kind(conn, ch[A][4], ch, "committed"),
    "edit first event": lambda conn, ch: edit_detail(conn, ch[C][0], ch),
    "delete middle event": lambda conn, ch: delete(conn, ch[B][1], ch),
    "delete first event": lambda conn, ch: delete(conn, ch[A][0], ch),
    "delete newest event": lambda conn, ch: delete(conn, ch[A][4], ch),
    "delete all events of a key": lambda conn, ch: delete_key_events(conn, B, ch),
    "forged event in the middle": lambda conn, ch: forge_in_middle(conn, B, 2, ch),
    "forged event appended": lambda conn, ch: forge_at_end(conn, C, ch),
    "swap adjacent events": lambda conn, ch: swap(conn, ch[A][1], ch[A][2]),
    "swap distant events": lambda conn, ch: swap(conn, ch[C][0], ch[C][4]),
}


@pytest.mark.parametrize("how", ["replica", "disable trigger"])
@pytest.mark.parametrize("case", CASES)
def test_tampering_is_detected_at_the_first_bad_event(
    built, bconn: psycopg.Connection, case: str, how: str
):
    with tampering(bconn, how):
        expected = CASES[case](bconn, built)
        result = chain.verify(bconn)
        assert not result.ok
        assert where(result.first_problem) == expected
        assert result.keys == 3 - (case == "delete all events of a key")
    assert chain.verify(bconn).ok  # rolled back: intact again


def test_problem_messages_say_what_happened(built, bconn: psycopg.Connection):
    with tampering(bconn):
        edit_detail(bconn, built[B][1], built)
        problem = chain.verify(bconn).first_problem
    assert str(problem) == (
        f"event id {built[B][1].id} (key {B!r}, seq 2): "
        "hash does not match the event's content (edited)"
    )
    with tampering(bconn):
        delete(bconn, built[A][4], built)
        problem = chain.verify(bconn).first_problem
    assert str(problem).startswith(f"key {A!r}: ledger row says the chain ends at event 5")
    with tampering(bconn):
        forge_at_end(bconn, C, built)
        problem = chain.verify(bconn).first_problem
    assert "the events end at 6" in problem.reason
    with tampering(bconn):
        delete_key_events(bconn, B, built)
        problem = chain.verify(bconn).first_problem
    assert problem.reason == "ledger row records 4 events but none exist (deleted)"


def test_problems_are_reported_for_every_damaged_key(built, bconn: psycopg.Connection):
    with tampering(bconn):
        edit_attempt(bconn, built[A][0], built)
        edit_attempt(bconn, built[B][3], built)
        result = chain.verify(bconn)
    assert [where(p) for p in result.problems] == [(A, 1, built[A][0].id), (B, 4, built[B][3].id)]


# --- the append-only trigger ----------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE eos.ledger_events SET detail = '{}'",
        "UPDATE eos.ledger_events SET attempt = attempt WHERE false",
        "DELETE FROM eos.ledger_events WHERE seq > 1",
        "TRUNCATE eos.ledger_events",
    ],
)
def test_events_are_append_only(ledger: Ledger, conn: psycopg.Connection, statement: str):
    ledger.run("k", ok())
    before = conn.execute("SELECT * FROM eos.ledger_events ORDER BY id").fetchall()
    with pytest.raises(psycopg.Error, match="ledger events are append-only") as err:
        conn.execute(statement)
    assert err.value.sqlstate == "EOS02"
    assert conn.execute("SELECT * FROM eos.ledger_events ORDER BY id").fetchall() == before
    assert chain.verify(conn).ok


# --- property: random ledgers, one random tampering -----------------------------------------


OPS = {
    "commit": dict(fn=ok(), on_committed="skip"),
    "fail": dict(fn=boom, on_committed="skip"),
    "replace": dict(fn=ok(2), on_committed="replace"),
    "failed replace": dict(fn=boom, on_committed="replace"),
    "refuse": dict(fn=ok(), on_committed="fail"),
}
plans = st.lists(  # per key: a list of (operation, attempt)
    st.lists(st.tuples(st.sampled_from(list(OPS)), st.integers(1, 3)), min_size=1, max_size=4),
    min_size=1,
    max_size=3,
)
TAMPERS = ("edit detail", "edit at", "edit attempt", "edit event kind", "delete", "swap")


def test_random_tampering_of_random_ledgers_is_detected(pg_admin_dsn: str, template_db: str):
    with (
        fresh_database(pg_admin_dsn, template_db) as dsn,
        Ledger(dsn) as ledger,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(plan=plans, data=st.data())
        def check(plan: list[list[tuple[str, int]]], data: st.DataObject) -> None:
            prefix = uuid.uuid4().hex[:8]
            keys = [f"{prefix}/{i}" for i in range(len(plan))]
            for key, ops in zip(keys, plan, strict=True):
                for op, attempt in ops:
                    with contextlib.suppress(Boom, AlreadyCommittedError, FencedError):
                        ledger.run(
                            key,
                            OPS[op]["fn"],
                            attempt=attempt,
                            on_committed=OPS[op]["on_committed"],
                            origin=TI,
                        )
            total = conn.execute("SELECT count(*) FROM eos.ledger_events").fetchone()[0]
            intact = chain.verify(conn)
            assert intact.ok, intact.problems
            assert intact.events == total

            chains = {key: chain_of(conn, key) for key in keys}
            target = data.draw(
                st.sampled_from([ev for key in keys for ev in chains[key]]), label="event"
            )
            how = data.draw(st.sampled_from(TAMPERS), label="tampering")
            with tampering(conn):
                if how == "edit event kind":
                    kind = data.draw(
                        st.sampled_from([k for k in EVENT_KINDS if k != target.event]), label="kind"
                    )
                    expected = edit_kind(conn, target, chains, kind)
                elif how == "swap":
                    other = data.draw(
                        st.sampled_from([ev for ev in chains[target.key] if ev != target]),
                        label="other",
                    )
                    first, second = sorted((target, other), key=lambda ev: ev.seq)
                    expected = swap(conn, first, second)
                else:
                    expected = {
                        "edit detail": edit_detail,
                        "edit at": edit_at,
                        "edit attempt": edit_attempt,
                        "delete": delete,
                    }[how](conn, target, chains)
                result = chain.verify(conn)
                assert not result.ok
                assert where(result.first_problem) == expected
            assert chain.verify(conn).ok

        check()
