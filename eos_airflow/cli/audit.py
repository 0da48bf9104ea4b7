"""``eos-airflow ledger export`` and ``ledger stats``: the audit trail, read-only."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, TextIO

import psycopg
from psycopg.rows import dict_row
from rich.progress import Progress

from eos_airflow.cli import output
from eos_airflow.ledger.filters import like_prefix, parse_since
from eos_airflow.ledger.queries import query
from eos_airflow.ledger.tables import EVENT_KINDS

EXPORT_COLUMNS = ("id", "key", "seq", "event", "attempt", "at", "detail", "prev_hash", "hash")
STAT_EVENTS = EVENT_KINDS
#: Rows fetched per round trip while exporting.
EXPORT_BATCH = 5000


def export(conn: psycopg.Connection[Any], args: argparse.Namespace) -> int:
    params = {"since": parse_since(args.since), "prefix": like_prefix(args.prefix)}
    out: TextIO = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        total = conn.execute(query("count_events", args.schema), params).fetchone()[0]
        show_progress = bool(args.output) and sys.stderr.isatty()
        written = _write(conn, args, params, out, total, show_progress)
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"exported {written} events to {args.output}", file=sys.stderr)
    return written


def _write(
    conn: psycopg.Connection[Any],
    args: argparse.Namespace,
    params: dict[str, Any],
    out: TextIO,
    total: int,
    show_progress: bool,
) -> int:
    writer = csv.writer(out) if args.format == "csv" else None
    if writer:
        writer.writerow(EXPORT_COLUMNS)
    written = 0
    with (
        Progress(disable=not show_progress, transient=True) as progress,
        conn.transaction(),
        conn.cursor("eos_export", row_factory=dict_row) as cur,
    ):
        task = progress.add_task("exporting events", total=total)
        cur.itersize = EXPORT_BATCH
        cur.execute(query("export_events", args.schema), params)
        for row in cur:
            row["at"] = row["at"].isoformat()
            if writer:
                writer.writerow(
                    [
                        json.dumps(row[c], sort_keys=True) if c == "detail" else row[c]
                        for c in EXPORT_COLUMNS
                    ]
                )
            else:
                out.write(json.dumps(row, sort_keys=True) + "\n")
            written += 1
            if written % EXPORT_BATCH == 0:
                progress.update(task, completed=written)
    return written


def stats(conn: psycopg.Connection[Any], args: argparse.Namespace) -> dict[str, Any]:
    since = parse_since(args.since)
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(
        query("stats_by_group", args.schema), {"since": since, "by": args.by}
    ).fetchall()
    totals = dict.fromkeys(STAT_EVENTS, 0)
    groups: dict[str, dict[str, int]] = {}
    for row in rows:
        totals[row["event"]] = totals.get(row["event"], 0) + row["n"]
        groups.setdefault(row["grp"], dict.fromkeys(STAT_EVENTS, 0))[row["event"]] = row["n"]
    latency = cur.execute(query("commit_latency", args.schema), {"since": since}).fetchone()
    states = {r["state"]: r["n"] for r in cur.execute(query("entry_states", args.schema), {})}
    return {
        **totals,
        "duplicates_prevented": totals["skipped"] + totals["fenced"],
        "entries": states,
        "commit_latency_ms": {
            k: (None if latency[k] is None else round(float(latency[k]), 3))
            for k in ("p50", "p95", "p99", "max")
        },
        f"by_{args.by}": groups,
        "since": since.isoformat() if since else None,
    }


def print_stats(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.format == "json":
        output.emit(args, data, str)
        return
    group_key = f"by_{args.by}"
    rows = [{args.by: name, **counts} for name, counts in sorted(data[group_key].items())]
    rows.append({args.by: "total", **{e: data[e] for e in STAT_EVENTS}})
    if args.format == "csv":
        output.write_csv((args.by, *STAT_EVENTS), rows)
        return
    output.table(args, "ledger events", (args.by, *STAT_EVENTS), rows)
    lat = data["commit_latency_ms"]
    print(f"duplicates prevented (skipped + fenced): {data['duplicates_prevented']}")
    print("entries: " + ", ".join(f"{k} {v}" for k, v in data["entries"].items()))
    print(
        f"claim-to-commit latency: p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
        f"p99 {lat['p99']} ms, max {lat['max']} ms"
    )
