"""Faces tier: ``eos-airflow ledger export`` and ``ledger stats``: the audit trail, read-only."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from datetime import datetime
from typing import Any, TextIO

import psycopg
from rich.progress import Progress

from eos_airflow.cli import output
from eos_airflow.ledger.filters import parse_since
from eos_airflow.ledger.store import LedgerStore
from eos_airflow.ledger.tables import EVENT_KINDS

EXPORT_COLUMNS = ("id", "key", "seq", "event", "attempt", "at", "detail", "prev_hash", "hash")
STAT_EVENTS = EVENT_KINDS
#: Rows fetched per round trip while exporting.
EXPORT_BATCH = 5000


def export(conn: psycopg.Connection[Any], args: argparse.Namespace) -> int:
    store = LedgerStore(conn, args.schema)
    since = parse_since(args.since)
    out: TextIO = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        total = store.count_events(since=since, prefix=args.prefix)
        show_progress = bool(args.output) and sys.stderr.isatty()
        written = _write(store, args, since, out, total, show_progress)
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"exported {written} events to {args.output}", file=sys.stderr)
    return written


def _write(
    store: LedgerStore,
    args: argparse.Namespace,
    since: datetime | None,
    out: TextIO,
    total: int,
    show_progress: bool,
) -> int:
    writer = csv.writer(out) if args.format == "csv" else None
    if writer:
        writer.writerow(EXPORT_COLUMNS)
    written = 0
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("exporting events", total=total)
        for rows in store.export_events(since=since, prefix=args.prefix, batch=EXPORT_BATCH):
            for row in rows:
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
            written += len(rows)
            progress.update(task, completed=written)
    return written


def stats(conn: psycopg.Connection[Any], args: argparse.Namespace) -> dict[str, Any]:
    since = parse_since(args.since)
    store = LedgerStore(conn, args.schema)
    totals: dict[str, int] = {str(kind): 0 for kind in STAT_EVENTS}
    groups: dict[str, dict[str, int]] = {}
    for row in store.event_counts(since=since, by=args.by):
        totals[row.event] = totals.get(row.event, 0) + row.n
        groups.setdefault(row.grp, {str(kind): 0 for kind in STAT_EVENTS})[row.event] = row.n
    latency = dataclasses.asdict(store.commit_latency(since=since))
    states = store.state_counts()
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
