"""Protocol tier: orphan files of lakehouse tables — files no table version references.

An effect that raised, or an attempt fenced by a newer one, rolls its catalog change back
with the effect: the table's pointer never names its metadata, but the data, manifest and
metadata files it wrote stay in storage. They are orphans: invisible to every reader, only
taking space. :func:`iceberg_orphans` finds them for an Iceberg table of the catalog
``"eos"`` — every file under the table's location that its current metadata does not
reference (the metadata files of its metadata log and the current one, every snapshot's
manifest list, every manifest, every data and delete file, statistics and partition
statistics files) and that is older than a cutoff, so the fresh files of an effect still
open are never touched. :func:`delete_iceberg_orphans` re-reads the table's pointer and
deletes only what is still unreferenced then. :func:`delta_orphans` does the same for a
Delta table through delta-rs' own full vacuum.

The cutoff must be longer than the longest effect: an effect open for longer than it could
still commit a snapshot that names files written at its start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from eos_airflow.errors import ConfigurationError

if TYPE_CHECKING:
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.table import Table

#: The catalog ``eos.iceberg`` writes (see :mod:`eos_airflow.protocol.iceberg`).
CATALOG_NAME = "eos"
CATALOG_SCHEMA = "public"
_SCHEMES = {"s3a": "s3", "s3n": "s3", "": "file"}


@dataclass(frozen=True)
class Orphan:
    """One unreferenced file: its table (``ns.table`` or a Delta URI), its full location,
    its size in bytes and when it was last modified (UTC)."""

    table: str
    path: str
    size: int | None
    modified: datetime | None


def parse_properties(pairs: Iterable[str], what: str = "--property") -> dict[str, str]:
    """``KEY=VALUE`` strings as a dictionary; anything else is a :class:`ConfigurationError`."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(
                f"{what} {pair!r} is not KEY=VALUE (e.g. {what} s3.endpoint=http://host:9000)"
            )
        found[key.strip()] = value
    return found


def reader_catalog(
    connect: Callable[[], psycopg.Connection[Any]], properties: Mapping[str, str]
) -> SqlCatalog:
    """pyiceberg's stock SQL catalog ``"eos"`` on connections from ``connect`` (read only:
    it never creates the catalog's tables)."""
    from pyiceberg.catalog import MetastoreCatalog
    from pyiceberg.catalog.sql import SqlCatalog
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    class _Reader(SqlCatalog):
        def __init__(self) -> None:
            MetastoreCatalog.__init__(self, CATALOG_NAME, **dict(properties))
            engine = create_engine("postgresql+psycopg://", creator=connect, poolclass=NullPool)
            self.engine = engine.execution_options(schema_translate_map={None: CATALOG_SCHEMA})
            with connect() as conn:
                row = conn.execute(
                    "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = "
                    "to_regclass(%s) AND attname = 'iceberg_type' AND NOT attisdropped)",
                    [f"{CATALOG_SCHEMA}.iceberg_tables"],
                ).fetchone()
            # as pyiceberg names the catalog's table layout (without iceberg_type: v0)
            self._schema_version = "v1" if row is None or row[0] else "v0"

    return _Reader()


def catalog_tables(catalog: SqlCatalog) -> list[str]:
    """Every table of the catalog as ``ns.table`` (none when it has no catalog tables yet)."""
    from sqlalchemy.exc import ProgrammingError

    found: list[str] = []
    try:
        pending = [tuple(n) for n in catalog.list_namespaces()]
        seen: set[tuple[str, ...]] = set()
        while pending:
            namespace = pending.pop()
            if namespace in seen:
                continue
            seen.add(namespace)
            found += [".".join(t) for t in catalog.list_tables(namespace)]
            pending += [tuple(n) for n in catalog.list_namespaces(namespace)]
    except ProgrammingError:  # no catalog tables: nothing was ever written
        return []
    return sorted(set(found))


def load(catalog: SqlCatalog, name: str) -> Table:
    """The table ``ns.table``; a missing one is a :class:`ConfigurationError`."""
    from pyiceberg.exceptions import NoSuchTableError
    from sqlalchemy.exc import ProgrammingError

    parts = tuple(name.split("."))
    if len(parts) < 2 or not all(parts):
        raise ConfigurationError(f"--table {name!r} is not NAMESPACE.TABLE")
    try:
        return catalog.load_table(parts)
    except (NoSuchTableError, ProgrammingError):
        raise ConfigurationError(
            f"no Iceberg table {name!r} in catalog {CATALOG_NAME!r} of this database: check "
            "the name (`eos-airflow lake orphans` without --table checks every table)"
        ) from None


def _key(location: str, properties: Mapping[str, str]) -> tuple[str, str]:
    """A location as (scheme, path) — the same file however its URI is spelled."""
    from pyiceberg.io.pyarrow import PyArrowFileIO

    scheme, _netloc, path = PyArrowFileIO.parse_location(location, dict(properties))
    scheme = _SCHEMES.get(scheme, scheme)
    return scheme, path.rstrip("/") if scheme != "file" else path


def referenced(table: Table) -> set[tuple[str, str]]:
    """Every file the table's current metadata references, as :func:`_key` keys."""
    metadata, io = table.metadata, table.io
    locations = [table.metadata_location]
    locations += [entry.metadata_file for entry in metadata.metadata_log]
    locations += [s.statistics_path for s in metadata.statistics]
    locations += [s.statistics_path for s in getattr(metadata, "partition_statistics", [])]
    manifests: dict[str, Any] = {}
    for snapshot in metadata.snapshots:
        locations.append(snapshot.manifest_list)
        for manifest in snapshot.manifests(io):
            manifests.setdefault(manifest.manifest_path, manifest)
    for path, manifest in manifests.items():
        locations.append(path)
        for entry in manifest.fetch_manifest_entry(io, discard_deleted=False):
            locations.append(entry.data_file.file_path)
    return {_key(location, table.io.properties) for location in locations}


def _listing(location: str, properties: Mapping[str, str]) -> list[tuple[str, int, datetime]]:
    """Every file under ``location``: (full location, size, last modified in UTC)."""
    from pyarrow.fs import FileSelector, FileType  # type: ignore[import-untyped]
    from pyiceberg.io.pyarrow import PyArrowFileIO

    io = PyArrowFileIO(dict(properties))
    scheme, netloc, path = io.parse_location(location, io.properties)
    fs = io.fs_by_scheme(scheme, netloc)
    prefix = "file://" if _SCHEMES.get(scheme, scheme) == "file" else f"{scheme}://"
    infos = fs.get_file_info(FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    found = []
    for info in infos:
        if info.type != FileType.File or info.path.endswith("/"):  # an S3 directory marker
            continue
        modified = info.mtime
        if modified is not None and modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        found.append((prefix + info.path, int(info.size or 0), modified))
    return found


def iceberg_orphans(table: Table, name: str, cutoff: datetime) -> list[Orphan]:
    """The files under ``table``'s location that its metadata does not reference and that
    were last modified before ``cutoff`` (files without a modification time are kept)."""
    properties = table.io.properties
    known = referenced(table)
    return sorted(
        (
            Orphan(name, path, size, modified)
            for path, size, modified in _listing(table.location(), properties)
            if modified is not None and modified < cutoff and _key(path, properties) not in known
        ),
        key=lambda o: o.path,
    )


def delete_iceberg_orphans(catalog: SqlCatalog, orphans: list[Orphan]) -> list[Orphan]:
    """Delete ``orphans`` (from :func:`iceberg_orphans`) that are still unreferenced: each
    table's pointer is read again first, and a file its metadata references now is kept.
    Returns the files deleted."""
    from pyiceberg.io.pyarrow import PyArrowFileIO

    deleted: list[Orphan] = []
    for name in sorted({o.table for o in orphans}):
        table = load(catalog, name)
        properties = table.io.properties
        known = referenced(table)
        io = PyArrowFileIO(dict(properties))
        for orphan in (o for o in orphans if o.table == name):
            if _key(orphan.path, properties) in known:
                continue
            try:
                io.delete(orphan.path)
            except FileNotFoundError:
                continue  # gone already (another clean-up)
            deleted.append(orphan)
    return deleted


def retention_hours(cutoff: datetime, now: datetime | None = None) -> int:
    """The whole hours before ``now`` that ``cutoff`` lies, rounded up (a file younger than
    the cutoff is never older than the retention). ``now`` is when the cutoff was taken
    (a fraction of a second since does not count): the time spent since, reading tables,
    must not turn ``--older-than 0s`` into an hour."""
    now = now or datetime.now(UTC)
    seconds = int((now - cutoff).total_seconds())
    return max(0, math.ceil(seconds / 3600))


def delta_orphans(
    uri: str,
    storage_options: Mapping[str, str],
    cutoff: datetime,
    *,
    delete: bool,
    now: datetime | None = None,
) -> list[Orphan]:
    """Files of the Delta table at ``uri`` that no version in its log's retention
    references, older than ``cutoff`` (``now`` minus the age asked for, counted in whole
    hours, rounded up): delta-rs' full vacuum, which deletes them when ``delete``."""
    try:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError
    except ImportError as exc:
        raise ConfigurationError(
            f"--delta needs deltalake ({exc}): pip install 'eos-airflow[lakehouse]'"
        ) from exc
    try:
        table = DeltaTable(uri, storage_options=dict(storage_options) or None)
    except TableNotFoundError:
        raise ConfigurationError(
            f"no Delta table at {uri!r}: check the URI and --storage-option settings"
        ) from None
    root = uri.rstrip("/")
    sizes = _delta_sizes(root, storage_options)
    found = table.vacuum(
        retention_hours=retention_hours(cutoff, now),
        dry_run=not delete,
        enforce_retention_duration=False,
        full=True,
    )
    return [
        Orphan(uri, path if "://" in path else f"{root}/{path}", *sizes.get(path, (None, None)))
        for path in sorted(found)
    ]


def _delta_sizes(root: str, storage_options: Mapping[str, str]) -> dict[str, tuple[int, datetime]]:
    """Size and modification time of each file under a Delta table, by relative path
    (empty when the storage cannot be listed with these options)."""
    options = {k.upper(): v for k, v in storage_options.items()}
    properties = {}
    if root.startswith(("s3://", "s3a://")):
        properties = {
            "s3.endpoint": options.get("AWS_ENDPOINT_URL", options.get("AWS_ENDPOINT", "")),
            "s3.access-key-id": options.get("AWS_ACCESS_KEY_ID", ""),
            "s3.secret-access-key": options.get("AWS_SECRET_ACCESS_KEY", ""),
            "s3.region": options.get("AWS_REGION", ""),
        }
        properties = {k: v for k, v in properties.items() if v}
    try:
        files = _listing(root, properties)
    except OSError:
        return {}
    base = _key(root, properties)[1].rstrip("/") + "/"
    sizes = {}
    for path, size, modified in files:
        relative = _key(path, properties)[1]
        if relative.startswith(base):
            sizes[relative[len(base) :]] = (size, modified)
    return sizes


__all__ = [
    "Orphan",
    "catalog_tables",
    "delete_iceberg_orphans",
    "delta_orphans",
    "iceberg_orphans",
    "load",
    "parse_properties",
    "reader_catalog",
    "referenced",
    "retention_hours",
]
