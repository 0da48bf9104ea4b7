"""Tamper evidence, end to end: random ledgers built through the real protocol, one random
committed tampering by a superuser who disables the append-only trigger, then
`eos-airflow ledger verify` (with a heads file written before the tampering) must exit 1 and
name the first bad place.

Tamperings: an edit of any column of one event, a deletion, a forged insertion (well
hashed), a reorder, an edit of a ledger row, a truncated tail (history cut back and the row
set to match: only the heads file shows it) and a removed key (events and row).

EOS_TAMPER_EXAMPLES sets the number of random examples (default 12).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eos_airflow import AlreadyCommittedError, FencedError, Ledger, Origin
from eos_airflow.cli.main import main
from tests.conftest import create_database, drop_database

TI = Origin("sales", "load", "manual__1", -1)
EXAMPLES = int(os.environ.get("EOS_TAMPER_EXAMPLES", "12"))


class Boom(Exception):
    pass


def boom(eos) -> None:
    eos.conn.execute("SELECT 1")
    raise Boom("no")


OPS: dict[str, tuple[Callable, str]] = {
    "commit": (lambda eos: {"attempt": eos.attempt}, "skip"),
    "fail": (boom, "skip"),
    "replace": (lambda eos: {"replaced": eos.attempt}, "replace"),
    "failed replace": (boom, "replace"),
    "refuse": (lambda eos: 1, "fail"),
}
plans = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(sorted(OPS)), st.integers(1, 3)),
    min_size=1,
    max_size=10,
)
EVENT_COLUMNS = ("key", "seq", "event", "attempt", "at", "detail", "prev_hash", "hash", "id")
TAMPERS = ("edit", "delete", "insert", "reorder", "row", "truncate tail", "remove key")


@dataclass(frozen=True)
class Ev:
    id: int
    key: str
    seq: int
    event: str


def verify(dsn: str, heads: Path) -> tuple[int, dict]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["ledger", "verify", "--format", "json", "--heads", str(heads), "--dsn", dsn])
    assert out.getvalue(), err.getvalue()
    return code, json.loads(out.getvalue())


def write_heads(dsn: str, path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["ledger", "heads", "--out", str(path), "--dsn", dsn]) == 0


def chains(conn: psycopg.Connection) -> dict[str, list[Ev]]:
    out: dict[str, list[Ev]] = {}
    for row in conn.execute(
        'SELECT id, key, seq, event::text FROM eos.ledger_events ORDER BY key COLLATE "C", seq'
    ):
        out.setdefault(row[1], []).append(Ev(*row))
    return out


FORGE = """
    INSERT INTO eos.ledger_events (key, seq, event, attempt, at, detail, prev_hash, hash)
    SELECT k, s, 'committed', 1, now(), '{}', p,
           eos.event_hash(p, k, s, 'committed', 1, now(), '{}')
    FROM (SELECT %(key)s::text AS k, %(seq)s::bigint AS s,
                 coalesce((SELECT hash FROM eos.ledger_events
                           WHERE key = %(key)s AND seq = %(seq)s - 1),
                          decode(repeat('00', 32), 'hex')) AS p) AS forged
"""

EDITS = {  # column -> SET clause that changes it
    "key": "key = key || chr(127)",  # a new key that sorts right after the original
    "seq": "seq = seq + 1000",
    "event": None,  # another kind, drawn below
    "attempt": "attempt = attempt + 1",
    "at": "at = at - interval '1 microsecond'",
    "detail": """detail = detail || '{"amount": 0}'""",
    "prev_hash": "prev_hash = sha256(prev_hash)",
    "hash": "hash = sha256(hash)",
    "id": "id = -id",  # ids grow along a chain; the hash does not cover them
}

ROW_EDITS = {
    "state": "state = (CASE WHEN state = 'committed' THEN 'failed' ELSE 'committed' END)"
    "::eos.effect_state",
    "version": "version = version + 1",
    "attempt": "attempt = attempt + 1",
    "event_seq": "event_seq = event_seq - 1",
    "last_hash": "last_hash = sha256(last_hash)",
}


def tamper(
    conn: psycopg.Connection, how: str, ch: dict[str, list[Ev]], data: st.DataObject
) -> tuple[str, int | None, int | None]:
    """Do one tampering; return where verify must report the first problem
    (key, seq, event id), None where it cannot be pinned down more than the key."""
    key = data.draw(st.sampled_from(sorted(ch)), label="key")
    chain = ch[key]
    ev = data.draw(st.sampled_from(chain), label="event")
    after = chain[ev.seq] if ev.seq < len(chain) else None  # the next event, if any
    if how == "edit":
        column = data.draw(st.sampled_from(EVENT_COLUMNS), label="column")
        if column == "event":
            kind = data.draw(
                st.sampled_from(
                    [
                        k
                        for k in ("claimed", "committed", "replaced", "skipped", "fenced", "failed")
                        if k != ev.event
                    ]
                ),
                label="kind",
            )
            conn.execute("UPDATE eos.ledger_events SET event = %s WHERE id = %s", [kind, ev.id])
        else:
            conn.execute(
                f"UPDATE eos.ledger_events SET {EDITS[column]} WHERE id = %s",  # noqa: S608
                [ev.id],
            )
        if column in ("key", "seq") and after is not None:  # a hole where ev was
            return key, after.seq, after.id
        if column == "key":  # the newest event moved away: the row's head shows it
            return key, len(chain), None
        if column == "seq":
            return key, ev.seq + 1000, ev.id
        return key, ev.seq, (-ev.id if column == "id" else ev.id)
    if how == "delete":
        conn.execute("DELETE FROM eos.ledger_events WHERE id = %s", [ev.id])
        return (key, after.seq, after.id) if after else (key, ev.seq, None)
    if how == "insert":  # a well-hashed forged event as number ev.seq, later ones shifted
        conn.execute(
            "UPDATE eos.ledger_events SET seq = -seq - 1 WHERE key = %s AND seq >= %s",
            [key, ev.seq],
        )
        conn.execute("UPDATE eos.ledger_events SET seq = -seq WHERE key = %s AND seq < 0", [key])
        conn.execute(FORGE, {"key": key, "seq": ev.seq})
        return key, ev.seq + 1, ev.id
    if how == "reorder":
        if len(chain) == 1:
            return tamper(conn, "delete", {key: chain}, data)
        other = data.draw(st.sampled_from([e for e in chain if e != ev]), label="other")
        first, second = sorted((ev, other), key=lambda e: e.seq)
        conn.execute(
            "UPDATE eos.ledger_events SET seq = -seq WHERE id IN (%s, %s)", [first.id, second.id]
        )
        conn.execute("UPDATE eos.ledger_events SET seq = %s WHERE id = %s", [second.seq, first.id])
        conn.execute("UPDATE eos.ledger_events SET seq = %s WHERE id = %s", [first.seq, second.id])
        return key, first.seq, second.id
    if how == "row":
        column = data.draw(st.sampled_from(sorted(ROW_EDITS)), label="row column")
        conn.execute(
            f"UPDATE eos.ledger SET {ROW_EDITS[column]} WHERE key = %s",  # noqa: S608
            [key],
        )
        head = {"event_seq": len(chain) - 1, "last_hash": len(chain)}.get(column)
        return key, head, None
    if how == "truncate tail":  # cut back to ev, and make the row agree with what is left
        conn.execute("DELETE FROM eos.ledger_events WHERE key = %s AND seq > %s", [key, ev.seq - 1])
        conn.execute("DELETE FROM eos.ledger WHERE key = %s AND %s = 1", [key, ev.seq])
        conn.execute(
            """
            UPDATE eos.ledger AS l SET event_seq = e.seq, last_hash = e.hash, attempt = e.attempt,
                   version = (SELECT count(*) FROM eos.ledger_events AS c WHERE c.key = l.key
                              AND c.event::text IN ('committed', 'replaced')),
                   state = CASE WHEN EXISTS (SELECT 1 FROM eos.ledger_events AS c
                                             WHERE c.key = l.key
                                               AND c.event::text IN ('committed', 'replaced'))
                                THEN 'committed'::eos.effect_state
                                ELSE 'failed'::eos.effect_state END
            FROM eos.ledger_events AS e
            WHERE l.key = %(key)s AND e.key = %(key)s AND e.seq = (
                SELECT max(seq) FROM eos.ledger_events WHERE key = %(key)s)""",
            {"key": key},
        )
        # the heads file names the key (a rough row fix, e.g. of a reopened key, may be
        # reported first, also by key)
        return key, None, None
    assert how == "remove key"
    conn.execute("DELETE FROM eos.ledger_events WHERE key = %s", [key])
    conn.execute("DELETE FROM eos.ledger WHERE key = %s", [key])
    return key, len(chain), None


def test_every_single_tampering_is_detected(pg_admin_dsn: str, template_db: str, tmp_path):
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(plan=plans, how=st.sampled_from(TAMPERS), data=st.data())
    def check(plan: list[tuple[int, str, int]], how: str, data: st.DataObject) -> None:
        name = f"eos_tamper_{uuid.uuid4().hex[:10]}"
        dsn = create_database(pg_admin_dsn, name, template=template_db)
        try:
            with Ledger(dsn) as ledger:
                for key_no, op, attempt in plan:
                    fn, on_committed = OPS[op]
                    with contextlib.suppress(Boom, AlreadyCommittedError, FencedError):
                        ledger.run(
                            f"k/{key_no}", fn, attempt=attempt, on_committed=on_committed, origin=TI
                        )
            heads = tmp_path / f"{name}.json"
            write_heads(dsn, heads)
            assert verify(dsn, heads)[0] == 0
            with psycopg.connect(dsn) as conn:
                ch = chains(conn)
                conn.execute(
                    "ALTER TABLE eos.ledger_events DISABLE TRIGGER ledger_events_append_only"
                )
                expected = tamper(conn, how, ch, data)
                conn.execute(
                    "ALTER TABLE eos.ledger_events ENABLE TRIGGER ledger_events_append_only"
                )
            code, result = verify(dsn, heads)
            assert code == 1, result
            first = result["first_bad"]
            got = (first["key"], first["seq"], first["event_id"])
            if expected[1] is None:  # a row edit or a cut tail: the key, no event
                assert (got[0], got[2]) == (expected[0], None), (how, first)
            else:
                assert got == expected, (how, first)
        finally:
            drop_database(pg_admin_dsn, name)

    check()


@pytest.mark.slow
def test_many_tamperings_are_detected(pg_admin_dsn: str, template_db: str, tmp_path, monkeypatch):
    """The same property with EOS_TAMPER_EXAMPLES (default here 200) examples."""
    monkeypatch.setattr(
        sys.modules[__name__], "EXAMPLES", int(os.environ.get("EOS_TAMPER_EXAMPLES", "200"))
    )
    test_every_single_tampering_is_detected(pg_admin_dsn, template_db, tmp_path)
