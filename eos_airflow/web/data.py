"""Faces tier: what the audit page shows, read from the ledger through :class:`LedgerStore`.

Every function takes an open psycopg connection and the ledger schema, and returns plain
JSON-ready data. ``dag_ids`` restricts the rows to DAGs the user may read (``None``: all).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from eos_airflow.ledger.chain import verify as verify_chain
from eos_airflow.ledger.filters import parse_since
from eos_airflow.ledger.store import LedgerStore
from eos_airflow.states import EntryState

#: Most entries one page of the audit view lists.
MAX_ENTRIES = 1000
STATES = tuple(EntryState)


def _plain(record: Any) -> dict[str, Any]:
    out = {}
    for name, value in dataclasses.asdict(record).items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, bytes | memoryview):
            value = bytes(value).hex()
        out[name] = value
    return out


def entries(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    state: str | None = None,
    dag_id: str | None = None,
    prefix: str | None = None,
    since: str | None = None,
    limit: int = 200,
    dag_ids: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Ledger entries, newest change first, filtered like ``ledger list``."""
    rows = LedgerStore(conn, schema).recent_entries(
        dag_id=dag_id,
        state=state,
        prefix=prefix,
        since=parse_since(since),
        dag_ids=None if dag_ids is None else sorted(dag_ids),
        limit=max(1, min(limit, MAX_ENTRIES)),
    )
    return [_plain(r) for r in rows]


def entry(conn: psycopg.Connection[Any], schema: str, key: str) -> dict[str, Any] | None:
    """One entry with its event timeline, or None."""
    store = LedgerStore(conn, schema)
    row = store.entry(key)
    if row is None:
        return None
    events = store.events(key)
    shown = _plain(row)
    shown.pop("owner", None)
    return {"entry": shown, "events": [_plain(e) for e in events]}


def ti_entries(
    conn: psycopg.Connection[Any],
    schema: str,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int,
) -> list[dict[str, Any]]:
    """The entries (with timelines) of the keys one task instance touched."""
    keys = LedgerStore(conn, schema).task_instance_keys(dag_id, task_id, run_id, map_index)
    found = (entry(conn, schema, k) for k in keys)
    return [e for e in found if e is not None]


def activity(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    since: str | None = None,
    bucket: str = "hour",
    dag_ids: set[str] | None = None,
) -> dict[str, Any]:
    """Commits, skips, fences and failures per hour or day."""
    start = parse_since(since) or datetime.now(timezone.utc) - timedelta(days=7)
    rows = LedgerStore(conn, schema).activity(
        since=start, bucket=bucket, dag_ids=None if dag_ids is None else sorted(dag_ids)
    )
    return {"since": start.isoformat(), "bucket": bucket, "series": [_plain(r) for r in rows]}


def verification(conn: psycopg.Connection[Any], schema: str) -> dict[str, Any]:
    """The result of ``ledger verify`` (the whole ledger)."""
    result = verify_chain(conn, schema)
    return {
        "ok": result.ok,
        "events": result.events,
        "keys": result.keys,
        "problems": result.problem_count,
        "first_bad": None if result.first_problem is None else str(result.first_problem),
        "details": [str(p) for p in result.problems[:20]],
    }
