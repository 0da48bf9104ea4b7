"""The events' hash chain: recompute it independently of the database and check it.

Each key's events form a chain: event ``seq`` stores ``prev_hash`` (the hash of event
``seq - 1``, or 32 zero bytes for the first) and ``hash = SHA-256(prev_hash || canonical)``,
where ``canonical`` is the UTF-8 of key, seq, event, attempt, ``at`` in microseconds since the
epoch and ``detail`` as PostgreSQL's jsonb text, joined by U+001F. The ledger row stores the
chain's head (``event_seq``, ``last_hash``), so deleting a key's newest event is detected too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg.rows import dict_row

from eos_airflow.ledger.queries import query

GENESIS = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def canonical(key: str, seq: int, event: str, attempt: int, at: datetime, detail: str) -> bytes:
    """The bytes hashed for one event (the ledger's ``event_hash`` function computes the same)."""
    at_us = (at - _EPOCH) // _MICROSECOND
    return "\x1f".join((key, str(seq), event, str(attempt), str(at_us), detail)).encode()


def event_hash(prev_hash: bytes, row: dict[str, Any]) -> bytes:
    return hashlib.sha256(
        prev_hash + canonical(row["key"], row["seq"], row["event"], row["attempt"], row["at"],
                              row["detail"])
    ).digest()


@dataclass
class Problem:
    """The first place where the chain does not hold."""

    key: str
    seq: int | None
    event_id: int | None
    reason: str

    def __str__(self) -> str:
        where = f"event id {self.event_id} (key {self.key!r}, seq {self.seq})"
        if self.event_id is None:
            where = f"key {self.key!r}"
        return f"{where}: {self.reason}"


@dataclass
class Verification:
    events: int = 0
    keys: int = 0
    problems: list[Problem] = field(default_factory=list)  # the first max_problems of them
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None


def check_events(rows: Iterable[dict[str, Any]], heads: dict[str, tuple[int, bytes]],
                 *, max_problems: int = 100) -> Verification:
    """Check events ordered by (key, seq) against each other and against the ledger heads."""
    result = Verification()
    problems: list[Problem] = []
    key: str | None = None
    expected_seq, prev = 1, GENESIS

    def close_key(done: str) -> None:
        head = heads.pop(done, None)
        last_seq = expected_seq - 1
        if head is None:
            problems.append(Problem(done, None, None, "events exist but the ledger row is missing"))
        elif head != (last_seq, prev):
            problems.append(Problem(
                done, head[0], None,
                f"ledger row says the chain ends at event {head[0]} with hash "
                f"{head[1].hex()[:16]}…, the events end at {last_seq} with {prev.hex()[:16]}… "
                "(events deleted or appended outside the ledger)"))

    for row in rows:
        if row["key"] != key:
            if key is not None:
                close_key(key)
            key, expected_seq, prev = row["key"], 1, GENESIS
            result.keys += 1
        result.events += 1
        if row["seq"] != expected_seq:
            problems.append(Problem(key, row["seq"], row["id"],
                                    f"expected event number {expected_seq} of this key "
                                    "(an event is missing or reordered)"))
        elif bytes(row["prev_hash"]) != prev:
            problems.append(Problem(key, row["seq"], row["id"],
                                    "prev_hash does not match the previous event's hash"))
        elif event_hash(prev, row) != bytes(row["hash"]):
            problems.append(Problem(key, row["seq"], row["id"],
                                    "hash does not match the event's content (edited)"))
        expected_seq, prev = row["seq"] + 1, bytes(row["hash"])
    if key is not None:
        close_key(key)
    for orphan, (seq, _) in sorted(heads.items()):
        if seq > 0:
            problems.append(Problem(orphan, seq, None,
                                    f"ledger row records {seq} events but none exist (deleted)"))
    result.problems = problems[:max_problems]
    result.problem_count = len(problems)
    return result


def _stream(conn: psycopg.Connection[Any], schema: str) -> Iterator[dict[str, Any]]:
    with conn.transaction(), conn.cursor("eos_verify", row_factory=dict_row) as cur:
        cur.itersize = 5000
        cur.execute(query("chain_events", schema), {})
        yield from cur


def verify(conn: psycopg.Connection[Any], schema: str = "eos") -> Verification:
    """Walk every key's chain in the database."""
    with conn.cursor() as cur:
        heads = {k: (seq, bytes(h)) for k, seq, h in cur.execute(query("chain_heads", schema), {})}
    return check_events(_stream(conn, schema), heads)
