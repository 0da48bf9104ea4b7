"""Faces tier: ``ledger verify --heads``, ``ledger heads``, ``ledger gc`` and ``db grant``:
the commands that keep the audit trail trustworthy over time.

``ledger heads`` writes a heads file (:mod:`eos_airflow.ledger.heads`): every key's chain head,
to keep outside the database; ``ledger verify --heads FILE`` also checks that nothing it
recorded was removed since. ``ledger checkpoint`` and ``--checkpoint`` are their deprecated
former names: they still work and say so on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import psycopg
from rich.progress import Progress

from eos_airflow.cli import output
from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger import heads
from eos_airflow.ledger.chain import Verification, verify
from eos_airflow.ledger.filters import like_prefix, parse_since


def heads_path(args: argparse.Namespace) -> str | None:
    """The heads file ``ledger verify`` was given: ``--heads``, or the deprecated
    ``--checkpoint`` (with one deprecation line on stderr)."""
    if getattr(args, "checkpoint", None):
        deprecated(args, "`ledger verify --checkpoint FILE`", "`ledger verify --heads FILE`")
        return args.checkpoint
    return args.heads


def deprecated(args: argparse.Namespace, old: str, new: str) -> None:
    output.warning(args, f"{old} is deprecated; use {new} (it does the same)")


def verify_with_heads(conn: psycopg.Connection[Any], args: argparse.Namespace) -> Verification:
    path = heads_path(args)
    pinned = heads.load(path) if path else None
    result = verify(conn, args.schema)
    if pinned is not None:
        extra = heads.check(conn, args.schema, pinned)
        result.problems = (result.problems + extra)[:100]
        result.problem_count += len(extra)
    return result


def write_heads(conn: psycopg.Connection[Any], args: argparse.Namespace) -> None:
    taken = heads.take(conn, args.schema)
    try:
        heads.write(taken, args.out)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the heads file to {args.out!r}: {exc.strerror}; choose a writable path"
        ) from None
    summary = {
        k: taken[k]
        for k in ("schema", "database", "taken_at", "last_event", "events", "keys", "heads_digest")
    }
    output.emit(
        args,
        {**summary, "out": args.out},
        lambda d: (
            f"chain heads of {d['keys']} keys ({d['events']} events) written to "
            f"{d['out']} (heads digest {d['heads_digest'][:16]}…); keep the file outside this "
            "database and check it with `eos-airflow ledger verify --heads FILE`"
        ),
    )


def older_than(value: str) -> Any:
    try:
        return parse_since(value)
    except ConfigurationError:
        raise ConfigurationError(
            f"--older-than {value!r} is neither a duration (30d, 12h, 15m, 90s, 2w) nor an "
            "ISO timestamp (2024-01-31T00:00:00Z)"
        ) from None


def run_gc(conn: psycopg.Connection[Any], args: argparse.Namespace) -> None:
    from eos_airflow.ledger.gc import gc

    cutoff = older_than(args.older_than)
    show = sys.stderr.isatty() and args.format != "json"
    with Progress(disable=not show, transient=True) as progress:
        task = progress.add_task("pruning keys", total=None)

        def step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        report = gc(
            conn,
            args.schema,
            cutoff,
            dry_run=args.dry_run,
            prefix=like_prefix(args.prefix),
            progress=step,
        )
    verb = "would remove" if args.dry_run else "removed"
    output.emit(
        args,
        report.as_dict(),
        lambda d: (
            f"gc {verb} {d['events']} events of {d['keys']} committed keys "
            f"older than {d['cutoff']}"
            + (
                ""
                if args.dry_run or not d["keys"]
                else "; each key's chain now starts at a `pruned` event (ledger verify checks it)"
            )
        ),
    )


def grant_roles(conn: psycopg.Connection[Any], args: argparse.Namespace) -> None:
    from eos_airflow.ledger.roles import grant

    try:
        done = grant(conn, args.schema, args.writer, args.auditor)
        if getattr(args, "iceberg", False):
            done["iceberg_tables"] = _grant_iceberg(conn, args.writer, args.auditor)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigurationError(
            f"cannot create or grant the roles: {exc.diag.message_primary}; run "
            "`eos-airflow db grant` as the ledger schema's owner with CREATEROLE"
        ) from exc
    output.emit(
        args,
        done,
        lambda d: (
            f"roles for ledger schema {d['schema']!r}: writer {d['writer']!r} (inserts events, "
            f"cannot update or delete them), auditor {d['auditor']!r} (read-only)"
            + (
                f"; created {', '.join(d['created'])} (NOLOGIN: grant them to login roles)"
                if d["created"]
                else ""
            )
            + (
                f"; Iceberg catalog tables {', '.join(d['iceberg_tables'])}: the writer "
                "reads and writes them (its effects' commits), the auditor reads them"
                if d.get("iceberg_tables")
                else ""
            )
        ),
    )


def _grant_iceberg(conn: psycopg.Connection[Any], writer: str, auditor: str) -> list[str]:
    """Create the Iceberg catalog's tables (the writer may not create tables in ``public``)
    and grant their use."""
    from eos_airflow.ledger.roles import grant_tables

    try:
        from eos_airflow.protocol.iceberg import CATALOG_SCHEMA, create_catalog_tables
    except ImportError as exc:
        raise ConfigurationError(
            f"--iceberg needs pyiceberg ({exc}): pip install 'eos-airflow[lakehouse]'"
        ) from exc
    with conn.transaction():
        tables = create_catalog_tables(conn)
    grant_tables(conn, CATALOG_SCHEMA, tables, writer, auditor)
    return tables
