"""Faces tier: ``eos-airflow``: migrate, inspect and verify the ledger; run the demo.

The database comes from ``--dsn``, ``--conn-id`` (an Airflow connection) or ``EOS_LEDGER_DSN``.
Every command takes ``--format json``. Exit codes (the same with ``--dsn``, ``--conn-id`` and
``EOS_LEDGER_DSN``; docs/usage.md has the table): 0 fine, 1 a check failed (``ledger verify``,
``doctor``), 2 bad usage or input (also an unknown connection id), 3 the database cannot be
reached or refuses the connection, the ledger schema is missing or at another revision, or the
role lacks a privilege.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

import psycopg

from eos_airflow.cli import lake, outbox, output
from eos_airflow.cli.session import checked, connect_factory, open_connection
from eos_airflow.devtools import stack_cli as stack
from eos_airflow.errors import (
    NO_SUCH_KEY,
    NOT_REOPENABLE,
    ConfigurationError,
    DatabaseUnavailableError,
    EosError,
    LedgerSchemaError,
    PermissionDenied,
)
from eos_airflow.ledger.keys import check_schema
from eos_airflow.ledger.store import LedgerStore
from eos_airflow.states import EntryState

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from eos_airflow.ledger.migrate import head_revision, migrate

    try:
        applied = migrate(connect_factory(args), args.schema)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailableError(f"cannot connect to the ledger database: {exc}") from exc
    output.emit(
        args,
        {"schema": args.schema, "applied": applied, "revision": head_revision()},
        lambda d: (
            f"ledger schema {d['schema']!r} at revision {d['revision']}"
            + (f" (applied {', '.join(d['applied'])})" if d["applied"] else " (up to date)")
        ),
    )
    return EXIT_OK


def cmd_ledger_list(args: argparse.Namespace) -> int:
    with checked(args) as conn:
        rows = LedgerStore(conn, args.schema).entries(
            dag_id=args.dag_id,
            state=args.state,
            prefix=args.prefix,
            limit=args.limit,
            mismatched=args.mismatched,
        )
    output.entries(args, output.records(rows))
    return EXIT_OK


def cmd_ledger_show(args: argparse.Namespace) -> int:
    with checked(args) as conn:
        store = LedgerStore(conn, args.schema)
        entry = store.entry(args.key)
        if entry is None:
            raise ConfigurationError(
                f"no ledger entry for key {args.key!r}; list keys with "
                "`eos-airflow ledger list --prefix ...`"
            )
        events = store.events(args.key)
        points = store.recovery_points(args.key)
    output.entry(
        args,
        dataclasses.asdict(entry),
        output.records(events),
        recovery_points=output.records(points),
    )
    return EXIT_OK


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from eos_airflow.cli.integrity import verify_with_heads

    with checked(args) as conn:
        result = verify_with_heads(conn, args)
    output.verification(args, result)
    return EXIT_OK if result.ok else EXIT_VERIFY_FAILED


def cmd_ledger_heads(args: argparse.Namespace) -> int:
    from eos_airflow.cli.integrity import write_heads

    with checked(args) as conn:
        write_heads(conn, args)
    return EXIT_OK


def cmd_ledger_checkpoint(args: argparse.Namespace) -> int:
    """``ledger checkpoint``: the deprecated name of ``ledger heads``."""
    from eos_airflow.cli.integrity import deprecated

    deprecated(args, "`ledger checkpoint`", "`ledger heads --out FILE`")
    return cmd_ledger_heads(args)


def cmd_ledger_gc(args: argparse.Namespace) -> int:
    from eos_airflow.cli.integrity import older_than, run_gc

    older_than(args.older_than)  # bad input: refused before connecting
    with checked(args) as conn:
        run_gc(conn, args)
    return EXIT_OK


def cmd_db_grant(args: argparse.Namespace) -> int:
    from eos_airflow.cli.integrity import grant_roles

    with checked(args) as conn:
        grant_roles(conn, args)
    return EXIT_OK


def cmd_ledger_reopen(args: argparse.Namespace) -> int:
    import getpass

    if not args.reason.strip():
        raise ConfigurationError("--reason must say why the key is reprocessed (it is audited)")
    on_behalf_of = f"{getpass.getuser()}@{os.uname().nodename}"
    with checked(args) as conn:
        role = conn.info.user
        try:
            reopened = LedgerStore(conn, args.schema).reopen(args.key, args.reason, on_behalf_of)
        except psycopg.Error as exc:
            if exc.sqlstate == NO_SUCH_KEY:
                raise ConfigurationError(
                    f"no ledger entry for key {args.key!r}; list keys with "
                    "`eos-airflow ledger list --prefix ...`"
                ) from exc
            if exc.sqlstate == NOT_REOPENABLE:
                raise ConfigurationError(
                    f"{exc.diag.message_primary}: only a committed key with no running "
                    "attempt can be reopened"
                ) from exc
            raise
    output.emit(
        args,
        {
            "key": args.key,
            "state": "reopened",
            "version": reopened.version,
            "by": role,
            "on_behalf_of": on_behalf_of,
            "reason": args.reason,
        },
        lambda d: (
            f"reopened {d['key']!r} (version {d['version']}): its next run "
            "executes again and sees the committed result as eos.previous"
        ),
    )
    return EXIT_OK


def cmd_ledger_export(args: argparse.Namespace) -> int:
    from eos_airflow.cli import audit

    with checked(args) as conn:
        audit.export(conn, args)
    return EXIT_OK


def cmd_ledger_stats(args: argparse.Namespace) -> int:
    from eos_airflow.cli import audit

    with checked(args) as conn:
        data = audit.stats(conn, args)
    audit.print_stats(args, data)
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    from eos_airflow.cli import twophase
    from eos_airflow.ledger.filters import parse_since

    older_than = parse_since(args.older_than) if args.older_than else None
    if args.terminate:  # the coordinator is down: the participants decide (3PC)
        transactions = twophase.run(args, None)
        if args.format == "json":
            output.emit(args, {"transactions": transactions}, str)
        else:
            twophase.show(args, transactions)
        return EXIT_OK
    with checked(args) as conn:
        transactions = twophase.run(args, conn)  # in-doubt work first: it may release claims
        store = LedgerStore(conn, args.schema)
        rows = output.records(store.expire_claims(older_than))
        held = [] if older_than is None else output.records(store.live_claims(older_than))
    if args.format == "json":
        output.emit(args, {"expired": rows, "held": held, "transactions": transactions}, str)
        return EXIT_OK
    twophase.show(args, transactions)
    if not rows:
        print("no stale claims: every running key has a live owner")
    else:
        output.table(
            args,
            f"expired {len(rows)} stale claims (their next claim runs them again)",
            ("key", "attempt", "run_id", "claimed_at", "reason"),
            rows,
        )
    if held:
        output.table(
            args,
            f"left {len(held)} claims older than --older-than alone: their "
            "sessions are alive and may still commit (end a stuck one with "
            "pg_terminate_backend, then run recover again)",
            ("key", "attempt", "run_id", "host", "pid", "claimed_at"),
            held,
        )
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from eos_airflow.cli import doctor

    conn = open_connection(args)
    try:
        return doctor.run(conn, args)
    finally:
        conn.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from eos_airflow.devtools.demo import run_demo

    return run_demo(args)


def default_schema(args: argparse.Namespace) -> str:
    """The ledger schema when ``--schema`` is not given: ``EOS_LEDGER_SCHEMA``; else, for an
    Airflow connection (``--conn-id``), Airflow's ``[eos_airflow] ledger_schema``; else eos."""
    if os.environ.get("EOS_LEDGER_SCHEMA"):
        return os.environ["EOS_LEDGER_SCHEMA"]
    if getattr(args, "conn_id", None):
        from eos_airflow import config

        return config.ledger_schema()
    return "eos"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="libpq DSN or URI of the ledger database")
    common.add_argument("--conn-id", help="Airflow connection id of the ledger database")
    common.add_argument(
        "--schema",
        default=None,
        help="ledger schema (default: EOS_LEDGER_SCHEMA, else with --conn-id Airflow's "
        "[eos_airflow] ledger_schema, else eos)",
    )
    common.add_argument(
        "--format",
        choices=("table", "plain", "tsv", "json", "csv"),
        default="table",
        help="output format (default: table: a rich table on a terminal, plain aligned text "
        "with whole values when stdout is a pipe or a file)",
    )
    common.add_argument(
        "--tz", default=None, help="time zone for displayed timestamps (default: local)"
    )

    parser = argparse.ArgumentParser(
        prog="eos-airflow", description="Exactly-once effects for Apache Airflow: the ledger CLI."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="ledger schema").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    db.add_parser(
        "migrate", parents=[common], help="create or upgrade the ledger schema"
    ).set_defaults(func=cmd_db_migrate)
    grant = db.add_parser(
        "grant",
        parents=[common],
        help="roles: a writer that cannot edit history, a read-only auditor",
    )
    grant.add_argument("--writer", required=True, help="role the tasks connect as")
    grant.add_argument("--auditor", required=True, help="read-only role")
    grant.add_argument(
        "--iceberg",
        action="store_true",
        help="also create the Iceberg catalog's tables (eos.iceberg) and grant their use",
    )
    grant.set_defaults(func=cmd_db_grant)

    ledger = sub.add_parser("ledger", help="inspect the ledger").add_subparsers(
        dest="ledger_command", required=True, metavar="ACTION"
    )
    lst = ledger.add_parser("list", parents=[common], help="list effect keys")
    lst.add_argument("--dag-id")
    lst.add_argument("--state", choices=tuple(EntryState))
    lst.add_argument("--prefix", help="only keys starting with this text")
    lst.add_argument(
        "--mismatched",
        action="store_true",
        help="only keys whose committed version was skipped by a run with other inputs "
        "(a mismatch event: changed SQL, arguments or code)",
    )
    lst.add_argument("--limit", type=int, default=1000)
    lst.add_argument(
        "--wide",
        action="store_true",
        help="every column (default: key, state, attempt, version, committed_at)",
    )
    lst.set_defaults(func=cmd_ledger_list)
    show = ledger.add_parser("show", parents=[common], help="one key with its events")
    show.add_argument("key")
    show.set_defaults(func=cmd_ledger_show)
    verify = ledger.add_parser(
        "verify", parents=[common], help="check the events' hash chains and the rows they imply"
    )
    pinned = verify.add_mutually_exclusive_group()
    pinned.add_argument(
        "--heads",
        metavar="FILE",
        help="also check that nothing the heads file (`ledger heads`) recorded was removed",
    )
    # the deprecated former name of --heads: works, not listed
    pinned.add_argument("--checkpoint", metavar="FILE", help=argparse.SUPPRESS)
    verify.set_defaults(func=cmd_ledger_verify)
    heads_file = ledger.add_parser(
        "heads",
        parents=[common],
        help="write every key's chain head to a heads file kept elsewhere",
    )
    heads_file.add_argument("--out", required=True, metavar="FILE", help="where to write it")
    heads_file.set_defaults(func=cmd_ledger_heads)
    # the deprecated former name of `ledger heads`: works, not listed (no help=)
    legacy = ledger.add_parser(
        "checkpoint",
        parents=[common],
        description="Deprecated: use `eos-airflow ledger heads` (the same command).",
    )
    legacy.add_argument("--out", required=True, metavar="FILE", help="where to write it")
    legacy.set_defaults(func=cmd_ledger_checkpoint)
    gc = ledger.add_parser(
        "gc", parents=[common], help="remove old events of committed keys (stays verifiable)"
    )
    gc.add_argument(
        "--older-than",
        required=True,
        help="remove events older than this (30d, 12h, … or a timestamp)",
    )
    gc.add_argument("--prefix", help="only keys starting with this text")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed")
    gc.set_defaults(func=cmd_ledger_gc)

    reopen = ledger.add_parser(
        "reopen", parents=[common], help="deliberately reprocess a committed key (audited)"
    )
    reopen.add_argument("key")
    reopen.add_argument("--reason", required=True, help="why (recorded in the event)")
    reopen.set_defaults(func=cmd_ledger_reopen)
    export = ledger.add_parser(
        "export", parents=[common], help="every event (the audit trail) as JSON lines or CSV"
    )
    export.add_argument("--output", "-o", help="write to this file (default: stdout)")
    export.add_argument("--since", help="only events newer than 30d, 12h, … or a timestamp")
    export.add_argument("--prefix", help="only keys starting with this text")
    export.set_defaults(func=cmd_ledger_export)  # --format table means JSON lines here
    stats = ledger.add_parser(
        "stats", parents=[common], help="commits, skips (duplicates prevented), fences, failures"
    )
    stats.add_argument("--since", help="only events newer than 30d, 12h, … or a timestamp")
    stats.add_argument("--by", choices=("dag", "day"), default="dag", help="group rows by")
    stats.set_defaults(func=cmd_ledger_stats)

    recover = sub.add_parser(
        "recover",
        parents=[common],
        help="finish in-doubt multi-database commits, expire claims left "
        "by crashed or stalled attempts",
    )
    recover.add_argument(
        "--older-than",
        help="only expire claims taken before this (30m, "
        "2h, …); live claims that old are listed, never expired",
    )
    from eos_airflow.cli import twophase

    twophase.add_arguments(recover)
    recover.set_defaults(func=cmd_recover)

    sub.add_parser(
        "doctor", parents=[common], help="check database settings, schema revision, privileges"
    ).set_defaults(func=cmd_doctor)

    demo = sub.add_parser(
        "demo", parents=[common], help="run the example DAG through Airflow with injected crashes"
    )
    demo.add_argument("--workdir", default=".eos-demo", help="where the demo keeps its files")
    demo.set_defaults(func=cmd_demo)
    stack.add_parser(sub, common)
    outbox.add_parser(sub, common)
    lake.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout carries the command's output (JSON lines, CSV): keep library chatter off it
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if hasattr(args, "schema"):
            args.schema = check_schema(default_schema(args) if args.schema is None else args.schema)
        return args.func(args)
    except BrokenPipeError:  # `eos-airflow ledger export | head`: the reader has what it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except LedgerSchemaError as exc:
        output.error(args, exc)
        return EXIT_DATABASE
    except DatabaseUnavailableError as exc:
        output.error(args, exc)
        return EXIT_DATABASE
    except EosError as exc:
        output.error(args, exc)
        return EXIT_USAGE
    except psycopg.errors.InsufficientPrivilege as exc:  # e.g. the auditor role tried to write
        output.error(
            args,
            PermissionDenied(
                f"permission denied: {exc.diag.message_primary}; this command needs more "
                "privileges than the role it connected as (an auditor role only reads): run it "
                "as the ledger's owner or a role granted by `eos-airflow db grant --writer`"
            ),
        )
        return EXIT_DATABASE


if __name__ == "__main__":
    # run the imported module's main, not this __main__ copy: the subcommand modules import
    # eos_airflow.cli.main, and its exception classes must be the ones main() catches
    from eos_airflow.cli.main import main as _main

    sys.exit(_main())
