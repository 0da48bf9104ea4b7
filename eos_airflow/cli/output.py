"""How the CLI prints: rich tables for people, JSON lines or CSV for programs."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import pendulum
from rich.console import Console
from rich.table import Table

from eos_airflow.ledger.chain import Verification

_LIST_COLUMNS = (
    "key",
    "state",
    "attempt",
    "version",
    "dag_id",
    "task_id",
    "run_id",
    "map_index",
    "claimed_at",
    "committed_at",
)
_EVENT_COLUMNS = ("seq", "event", "attempt", "at", "detail")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _shown(args: argparse.Namespace, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        tz = args.tz or pendulum.local_timezone().name
        return pendulum.instance(value).in_timezone(tz).format("YYYY-MM-DD HH:mm:ss.SSS zz")
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=_plain, sort_keys=True) + "\n")


def table(
    args: argparse.Namespace, title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]
) -> None:
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_shown(args, row.get(c)) for c in columns))
    Console().print(table)


def write_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(
            [
                json.dumps(v) if isinstance(v, dict | list) else _plain(v)
                for v in (row.get(c) for c in columns)
            ]
        )


def emit(
    args: argparse.Namespace, data: dict[str, Any], text: Callable[[dict[str, Any]], str]
) -> None:
    if args.format == "json":
        _json(data)
    else:
        print(text(data))


def entries(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if args.format == "json":
        for row in rows:
            _json(row)
    elif args.format == "csv":
        write_csv(_LIST_COLUMNS, rows)
    else:
        table(args, f"{len(rows)} ledger entries", _LIST_COLUMNS, rows)


def entry(
    args: argparse.Namespace,
    row: dict[str, Any],
    events: list[dict[str, Any]],
    recovery_points: list[dict[str, Any]] | None = None,
) -> None:
    """One key: its ledger row, its events, and (chunked effects) its recovery points."""
    points = recovery_points or []
    if args.format == "json":
        _json({"entry": row, "events": events, "recovery_points": points})
    elif args.format == "csv":
        write_csv(("key", *_EVENT_COLUMNS, "hash"), events)
    else:
        table(
            args,
            f"ledger entry {row['key']}",
            (
                "state",
                "attempt",
                "version",
                "dag_id",
                "task_id",
                "run_id",
                "map_index",
                "host",
                "claimed_at",
                "committed_at",
                "result",
            ),
            [row],
        )
        table(args, f"{len(events)} events", _EVENT_COLUMNS, events)
        if points:
            table(
                args,
                f"{len(points)} recovery points (chunked effect)",
                ("version", "seq", "attempt", "rows", "position", "state", "at"),
                points,
            )


def verification(args: argparse.Namespace, result: Verification) -> None:
    first = result.first_problem
    data = {
        "ok": result.ok,
        "events": result.events,
        "keys": result.keys,
        "problems": result.problem_count,
        "first_bad": None
        if first is None
        else {
            "key": first.key,
            "seq": first.seq,
            "event_id": first.event_id,
            "reason": first.reason,
        },
    }
    if args.format == "json":
        _json(data)
    elif result.ok:
        print(f"ledger verified: {result.events} events of {result.keys} keys, hash chains intact")
    else:
        print(
            f"LEDGER VERIFICATION FAILED: {result.problem_count} problem(s) in "
            f"{result.events} events of {result.keys} keys",
            file=sys.stderr,
        )
        print(f"first bad event: {first}", file=sys.stderr)
        for problem in result.problems[1:10]:
            print(f"  also: {problem}", file=sys.stderr)


def error(args: argparse.Namespace, exc: Exception) -> None:
    if getattr(args, "format", None) == "json":
        sys.stderr.write(json.dumps({"error": type(exc).__name__, "message": str(exc)}) + "\n")
    else:
        print(f"eos-airflow: error: {exc}", file=sys.stderr)
