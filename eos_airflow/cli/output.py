"""Faces tier: how the CLI prints: rich tables for people, plain text, TSV, JSON lines or CSV for
programs.

``--format table`` (the default) draws a rich table when stdout is a terminal and plain
aligned text when it is not (a pipe, a file): the title, a header, then one line per row,
every value whole, so ``eos-airflow ledger list | grep acc/2026`` finds whole keys.
``--format plain`` asks for that text on a terminal too; ``--format tsv`` prints
tab-separated values with a header line. On a terminal narrower than the table, the
identifying columns (``key``, ``txid``, ``check``, ``dag``, ``day``, ``destination``) are
never broken: the other columns fold first, the least important are left out when that is
not enough (``ledger list`` without ``--wide``), and the table is printed as plain text
when nothing else fits. Rich decides what a terminal is: ``TTY_COMPATIBLE=1`` (or
``FORCE_COLOR``) makes a pipe one, ``COLUMNS`` sets the width.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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

_LIST_DEFAULT_COLUMNS = ("key", "state", "attempt", "version", "committed_at")
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


def records(items: Sequence[Any]) -> list[dict[str, Any]]:
    """The ledger's frozen records (dataclasses) as dictionaries, for tables and JSON."""
    return [dataclasses.asdict(item) for item in items]


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


# columns that identify a row: never folded mid-word, never left out on a narrow terminal
_IDENTIFYING = frozenset({"key", "txid", "check", "dag", "day", "destination"})


def _tsv_cell(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _plain_lines(columns: Sequence[str], cells: list[list[str]]) -> list[str]:
    """Header and rows, aligned by two spaces, nothing cut: one line per row."""
    cells = [[c.replace("\n", " ") for c in row] for row in cells]
    widths = [
        max([len(column), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)
    ]
    return [
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in [list(columns), *cells]
    ]


def _rich_table(
    title: str, columns: Sequence[str], cells: list[list[str]], keep: frozenset[str]
) -> Table:
    table = Table(title=title, show_lines=False)
    for i, column in enumerate(columns):
        if column in keep:
            longest = max([len(column), *(len(row[i]) for row in cells)])
            table.add_column(column, no_wrap=True, min_width=longest)
        else:
            table.add_column(column, overflow="fold")
    for row in cells:
        table.add_row(*row)
    return table


def table(
    args: argparse.Namespace,
    title: str,
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    *,
    droppable: bool = False,
) -> None:
    """Print rows as ``--format`` says (table, plain or tsv; json and csv are the callers').

    ``droppable``: on a terminal too narrow for every column, leave out columns from the
    right (the caller orders them by importance) rather than fold the identifying ones.
    """
    columns = list(columns)
    cells = [[_shown(args, row.get(c)) for c in columns] for row in rows]
    fmt = getattr(args, "format", "table")
    if fmt == "tsv":
        for line in [columns, *cells]:
            sys.stdout.write("\t".join(_tsv_cell(v) for v in line) + "\n")
        return
    console = Console()
    if fmt == "plain" or not console.is_terminal:
        sys.stdout.write("\n".join([title, *_plain_lines(columns, cells)]) + "\n")
        return
    keep = frozenset(c for c in columns if c in _IDENTIFYING)
    shown = list(range(len(columns)))
    while True:
        names = [columns[i] for i in shown]
        grid = [[row[i] for i in shown] for row in cells]
        rendered = _rich_table(title, names, grid, keep)
        fits = rendered.__rich_measure__(console, console.options).minimum <= console.width
        if fits or not droppable:
            break
        dropped = [i for i in shown if columns[i] not in keep]
        if not dropped:
            break
        shown.remove(dropped[-1])
    if not fits:  # even the identifying columns alone are wider than the terminal
        sys.stdout.write("\n".join([title, *_plain_lines(names, grid)]) + "\n")
        return
    if len(shown) < len(columns):
        left_out = ", ".join(c for i, c in enumerate(columns) if i not in shown)
        rendered.caption = f"left out for the terminal's width: {left_out}"
    console.print(rendered)


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
        columns = _LIST_COLUMNS if getattr(args, "wide", False) else _LIST_DEFAULT_COLUMNS
        wide = getattr(args, "wide", False)
        table(args, f"{len(rows)} ledger entries", columns, rows, droppable=not wide)


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
                "key",
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


def warning(args: argparse.Namespace, message: str) -> None:
    """One line on stderr (a JSON object with ``--format json``); stdout stays the output."""
    if getattr(args, "format", None) == "json":
        sys.stderr.write(json.dumps({"warning": message}) + "\n")
    else:
        print(f"eos-airflow: warning: {message}", file=sys.stderr)
