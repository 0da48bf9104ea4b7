"""What the audit page shows, read from the ledger with the named audit queries.

Every function takes an open psycopg connection and the ledger schema, and returns plain
JSON-ready data. ``dag_ids`` restricts the rows to DAGs the user may read (``None``: all).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg.rows import dict_row

from eos_airflow.ledger.chain import verify as verify_chain
from eos_airflow.ledger.filters import like_prefix, parse_since
from eos_airflow.ledger.queries import query

#: Most entries one page of the audit view lists.
MAX_ENTRIES = 1000
STATES = ("running", "committed", "failed", "reopened")


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, bytes | memoryview):
            value = bytes(value).hex()
        out[name] = value
    return out


def _scope(dag_ids: set[str] | None) -> dict[str, Any]:
    return {"all_dags": dag_ids is None, "dag_ids": sorted(dag_ids or ())}


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
    params = {
        "state": state,
        "dag_id": dag_id,
        "prefix": like_prefix(prefix),
        "since": parse_since(since),
        "limit": max(1, min(limit, MAX_ENTRIES)),
        **_scope(dag_ids),
    }
    with conn.cursor(row_factory=dict_row) as cur:
        return [_plain(r) for r in cur.execute(query("web_entries", schema), params)]


def entry(conn: psycopg.Connection[Any], schema: str, key: str) -> dict[str, Any] | None:
    """One entry with its event timeline, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query("get_entry", schema), {"key": key}).fetchone()
        if row is None:
            return None
        events = cur.execute(query("entry_events", schema), {"key": key}).fetchall()
    row.pop("owner", None)
    return {"entry": _plain(row), "events": [_plain(e) for e in events]}


def ti_entries(
    conn: psycopg.Connection[Any],
    schema: str,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int,
) -> list[dict[str, Any]]:
    """The entries (with timelines) of the keys one task instance touched."""
    keys = [
        k
        for (k,) in conn.execute(
            query("web_ti_keys", schema),
            {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index},
        )
    ]
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
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            query("web_activity", schema), {"since": start, "bucket": bucket, **_scope(dag_ids)}
        ).fetchall()
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
