"""Faces tier: ``eos-airflow lake orphans``: files of lakehouse tables that no table version
references (left by effects that rolled back or were fenced), listed or deleted.

Iceberg tables are those of the catalog ``"eos"`` in the ledger's database (every one, or
``--table NS.TABLE``); Delta tables are named by ``--delta URI``. Only files older than
``--older-than`` (default 1d) are considered: pick it longer than the longest effect.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from eos_airflow.cli import output
from eos_airflow.errors import ConfigurationError


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    lake = sub.add_parser(
        "lake", help="lakehouse tables: files no table version references"
    ).add_subparsers(dest="lake_command", required=True, metavar="ACTION")
    orphans = lake.add_parser(
        "orphans",
        parents=[common],
        help="list (or --delete) unreferenced files of Iceberg and Delta tables",
    )
    orphans.add_argument(
        "--older-than",
        default="1d",
        help="only files last modified before this: a duration (90s, 15m, 12h, 1d, 2w) or an "
        "ISO timestamp (default: 1d; longer than the longest effect)",
    )
    orphans.add_argument("--delete", action="store_true", help="delete the files listed")
    orphans.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="NS.TABLE",
        help="an Iceberg table of the catalog 'eos' (repeat; default: every table, unless "
        "--delta is given)",
    )
    orphans.add_argument(
        "--warehouse",
        help="only the Iceberg tables whose location is under this URI (when no --table)",
    )
    orphans.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pyiceberg FileIO property, e.g. s3.endpoint=http://host:9000 (repeat)",
    )
    orphans.add_argument(
        "--delta", action="append", default=[], metavar="URI", help="a Delta table (repeat)"
    )
    orphans.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="delta-rs storage option for --delta, e.g. AWS_ENDPOINT_URL=... (repeat)",
    )
    orphans.add_argument(
        "--json", dest="format", action="store_const", const="json", help="--format json"
    )
    orphans.set_defaults(func=cmd_lake_orphans)


def _age(modified: datetime | None, now: datetime) -> str:
    if modified is None:
        return ""
    seconds = int((now - modified).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def cmd_lake_orphans(args: argparse.Namespace) -> int:
    from eos_airflow.cli.integrity import older_than
    from eos_airflow.cli.session import connect_factory
    from eos_airflow.protocol import lake

    # every input is checked before anything is read or deleted
    cutoff, asked = older_than(args.older_than), datetime.now(UTC)
    if cutoff.tzinfo is None:
        cutoff = cutoff.replace(tzinfo=UTC)
    properties = lake.parse_properties(args.property)
    if args.warehouse:
        properties.setdefault("warehouse", args.warehouse)
    storage = lake.parse_properties(args.storage_option, "--storage-option")
    if storage and not args.delta:
        raise ConfigurationError("--storage-option applies to --delta tables: pass --delta URI")

    found: list[Any] = []
    deleted = 0
    if args.table or not args.delta:
        catalog = lake.reader_catalog(connect_factory(args), properties)
        try:
            names = args.table or lake.catalog_tables(catalog)
            tables = {name: lake.load(catalog, name) for name in names}
            if args.warehouse and not args.table:
                root = args.warehouse.rstrip("/") + "/"
                tables = {n: t for n, t in tables.items() if t.location().startswith(root)}
            iceberg = [
                orphan
                for name, table in tables.items()
                for orphan in lake.iceberg_orphans(table, name, cutoff)
            ]
            if args.delete:
                deleted += len(lake.delete_iceberg_orphans(catalog, iceberg))
            found += iceberg
        finally:
            catalog.engine.dispose()
    for uri in args.delta:
        delta = lake.delta_orphans(uri, storage, cutoff, delete=args.delete, now=asked)
        deleted += len(delta) if args.delete else 0
        found += delta

    now = datetime.now(UTC)
    rows = [
        {
            "table": o.table,
            "path": o.path,
            "size": o.size,
            "age": _age(o.modified, now),
            "modified": o.modified,
        }
        for o in found
    ]
    total = sum(o.size or 0 for o in found)
    summary = {"count": len(found), "bytes": total, "deleted": deleted if args.delete else 0}
    if args.format == "json":
        output.emit(args, {"orphans": rows, **summary}, lambda d: "")
        return 0
    output.table(args, "orphan files", ["table", "path", "size", "age"], rows)
    verb = f"{deleted} deleted" if args.delete else "none deleted (pass --delete)"
    print(f"{len(found)} orphan files, {total} bytes; {verb}")
    return 0
