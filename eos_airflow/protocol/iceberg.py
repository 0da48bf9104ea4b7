"""Protocol tier: Iceberg tables whose commits join the effect's transaction (``eos.iceberg``).

pyiceberg's SQL catalog commits a table by swapping its metadata pointer (a row of
``iceberg_tables``) with a compare-and-swap UPDATE. :class:`EffectCatalog` is that catalog,
unchanged, running on ``eos.conn``: each of its SQLAlchemy transactions is a savepoint inside
the effect's open transaction, so a new snapshot — and a namespace or table the effect
created — becomes visible exactly when the ledger commits the effect. A function that
raises, or an attempt fenced by a newer one, leaves only data and metadata files that no
pointer references.

The catalog is pyiceberg's ``SqlCatalog`` named ``"eos"``, with pyiceberg's own tables in
the schema ``public`` of the ledger's database; a stock reader sees every table written::

    SqlCatalog("eos", uri="postgresql+psycopg://USER@HOST/DB", warehouse="file:///lake")

Concurrent effects writing one table all land, one after the other: a commit first locks
the table's pointer row (until its effect ends: a second effect waits there for the first to
commit or roll back); when the pointer moved since the table was read, the change is
re-applied on the new metadata in the same transaction — pyiceberg rebuilds its snapshot,
keeping the data files written, and other changes (schema, properties) are checked against
the new metadata — so the swap itself cannot be lost. A change that the concurrent commit
invalidates (an overwrite whose files were replaced meanwhile), or pyiceberg's bounded
retries used up, end the effect with :class:`LakehouseConflictError` (retryable); nothing of
it is committed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from pyiceberg.catalog import Catalog, MetastoreCatalog
from pyiceberg.catalog.sql import IcebergTables, SqlCatalog, SqlCatalogBaseTable
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
    ValidationException,
)
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table, Transaction
from pyiceberg.table.update.schema import UpdateSchema
from pyiceberg.table.update.snapshot import ManageSnapshots
from pyiceberg.table.update.sorting import UpdateSortOrder
from pyiceberg.table.update.spec import UpdateSpec
from pyiceberg.table.update.statistics import UpdateStatistics
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.pool import StaticPool

from eos_airflow.errors import (
    ConfigurationError,
    EosError,
    LakehouseConflictError,
    LakehouseStorageError,
    MisuseError,
)
from eos_airflow.ledger.store import LedgerStore

if TYPE_CHECKING:
    from pyiceberg.io import FileIO
    from pyiceberg.table import CommitTableResponse
    from pyiceberg.table.metadata import TableMetadata
    from pyiceberg.table.update import TableRequirement, TableUpdate
    from pyiceberg.typedef import Identifier

    from eos_airflow.protocol.effect import Effect

#: The catalog's name: the ``catalog_name`` of its rows, and the name a reader passes.
CATALOG_NAME = "eos"
#: Where pyiceberg's catalog tables live in the ledger's database.
CATALOG_SCHEMA = "public"
#: Longest namespace or table name the catalog's columns hold.
_NAME_MAX = 255
_SAVEPOINT = "SAVEPOINT eos_iceberg"
_RELEASE = "RELEASE SAVEPOINT eos_iceberg"
_ROLLBACK = "ROLLBACK TO SAVEPOINT eos_iceberg"
#: How long a commit waits for a table's pointer locked by another effect (catalog property
#: ``eos.pointer-lock-timeout``, seconds): beyond, :class:`LakehouseConflictError` (retried).
LOCK_TIMEOUT_PROPERTY = "eos.pointer-lock-timeout"
DEFAULT_LOCK_TIMEOUT = 300.0
#: Serializes effects creating the catalog's tables (held to the end of the effect).
_CREATE_LOCK = "eos-airflow:iceberg-catalog"

T = TypeVar("T")


def _one(row: tuple[Any, ...] | None) -> Any:
    assert row is not None, "the query returns one row"
    return row[0]


def check_in_transaction(conn: psycopg.Connection[Any]) -> None:
    """Refuse catalog work on a connection outside a transaction: the effect that opened the
    table has ended."""
    if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        raise MisuseError(
            "an Iceberg table from eos.iceberg() was used after its effect ended; open it "
            "again inside the effect that writes it"
        )


class EffectConnection:
    """The effect's psycopg connection as SQLAlchemy's DBAPI connection: every transaction
    SQLAlchemy begins is a savepoint of the effect's transaction — its commit releases the
    savepoint, its rollback rolls back to it — and closing it leaves the connection open."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._open = False

    def cursor(self, *args: Any, **kwargs: Any) -> psycopg.Cursor[Any]:
        conn = self._conn
        if not self._open:
            check_in_transaction(conn)
            conn.execute(_SAVEPOINT)
            self._open = True
        kwargs.setdefault("row_factory", tuple_row)
        return conn.cursor(*args, **kwargs)

    def commit(self) -> None:
        if self._open:
            self._open = False
            self._conn.execute(_RELEASE)

    def rollback(self) -> None:
        if self._open:
            self._open = False
            if self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._conn.execute(_ROLLBACK)
                self._conn.execute(_RELEASE)

    def close(self) -> None:
        self.rollback()

    def reset(self) -> None:
        """A new effect: no savepoint of an earlier effect's transaction is open."""
        self._open = False

    def add_notice_handler(self, handler: Callable[..., Any]) -> None:
        """The effect's connection keeps its own notice handlers."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def engine_for(conn: psycopg.Connection[Any]) -> Any:
    """SQLAlchemy's engine on ``conn`` (its one pooled connection is :class:`EffectConnection`),
    made once per psycopg connection: a new engine per effect would initialize the dialect
    (a dozen queries) and compile pyiceberg's statements again (~10 ms an effect)."""
    cached = getattr(conn, "_eos_iceberg_engine", None)
    if cached is not None:
        engine, wrapper = cached
        wrapper.reset()
        return engine
    wrapper = EffectConnection(conn)
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: wrapper,
        poolclass=StaticPool,
        use_native_hstore=False,
    ).execution_options(schema_translate_map={None: CATALOG_SCHEMA})
    # kept on the connection (a cycle the collector frees with it)
    conn._eos_iceberg_engine = (engine, wrapper)  # type: ignore[attr-defined]
    return engine


def _unwrapped(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a catalog call; a statement the database refused raises psycopg's own error (so
    the protocol reports its SQLSTATE, e.g. a deadlock as retryable), and an error of ours
    raised under SQLAlchemy comes out as itself."""
    try:
        return call(*args, **kwargs)
    except StatementError as exc:
        if isinstance(exc.orig, (psycopg.Error, EosError)):
            raise exc.orig from exc
        raise


class EffectCatalog(SqlCatalog):
    """pyiceberg's SQL catalog ``"eos"`` on the effect's connection (see the module)."""

    def __init__(self, conn: psycopg.Connection[Any], **properties: str) -> None:
        # SqlCatalog.__init__ would open an engine of its own: only the properties are kept.
        MetastoreCatalog.__init__(self, CATALOG_NAME, **properties)
        self.conn = conn
        #: The effect writing through this catalog (set by :func:`catalog`).
        self.eos: Effect | None = None
        #: The table whose pointer the current commit locked (the next commit_table's).
        self._locked: tuple[str, ...] | None = None
        self.engine = engine_for(conn)
        self._schema_version = self._prepare_tables()

    def _prepare_tables(self) -> str:
        """Create pyiceberg's catalog tables if the database has none (with the effect);
        return the catalog's schema version as pyiceberg names it. Tables found existing
        (committed) are remembered on the connection; tables this effect creates are not (the
        effect may roll them back)."""
        known = getattr(self.conn, "_eos_iceberg_catalog", None)
        if known is not None:
            return str(known)
        existed = catalog_tables_exist(self.conn)
        if not existed:
            self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_CREATE_LOCK])
            try:
                _unwrapped(SqlCatalogBaseTable.metadata.create_all, self.engine)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigurationError(
                    "the Iceberg catalog's tables do not exist in the ledger's database and "
                    f"this role cannot create them ({exc.diag.message_primary}); run "
                    "`eos-airflow db grant --writer ROLE --auditor ROLE --iceberg` as the "
                    "ledger's owner (it creates them and grants the writer their use)"
                ) from exc
        typed = _one(
            self.conn.execute(
                "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attname = 'iceberg_type' AND NOT attisdropped)",
                [f"{CATALOG_SCHEMA}.iceberg_tables"],
            ).fetchone()
        )
        version = "v1" if typed else "v0"
        if existed:
            self.conn._eos_iceberg_catalog = version  # type: ignore[attr-defined]
        return version

    def load_table(self, identifier: str | Identifier) -> Table:
        with lake_errors(".".join(Catalog.identifier_to_tuple(identifier))):
            table = _unwrapped(super().load_table, identifier)
        return EffectTable(
            table.name(), table.metadata, table.metadata_location, table.io, self, table.config
        )

    def lock_pointer(self, identifier: Identifier) -> str | None:
        """Lock the table's pointer row until the effect ends — waiting at most
        :meth:`lock_timeout` for an effect that holds it to commit or roll back — and return
        the metadata location it holds then (None: no such table). One round trip: set
        ``lock_timeout`` for the lock alone, lock, and put the setting back."""
        namespace = Catalog.namespace_to_string(Catalog.namespace_from(identifier))
        name = Catalog.table_name_from(identifier)
        check_in_transaction(self.conn)
        wait = self.lock_timeout()
        script = sql.SQL(
            "SELECT set_config('eos.lock_timeout_before', current_setting('lock_timeout'), "
            "true); SELECT set_config('lock_timeout', {wait}, true); "
            "SELECT metadata_location FROM {schema}.{table} WHERE catalog_name = {catalog} "
            "AND table_namespace = {namespace} AND table_name = {name} FOR UPDATE; "
            "SELECT set_config('lock_timeout', current_setting('eos.lock_timeout_before'), "
            "true)"
        ).format(
            wait=sql.Literal(f"{int(wait * 1000)}ms"),
            schema=sql.Identifier(CATALOG_SCHEMA),
            table=sql.Identifier(IcebergTables.__tablename__),
            catalog=sql.Literal(self.name),
            namespace=sql.Literal(namespace),
            name=sql.Literal(name),
        )
        try:
            with self.conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(script)
                cur.nextset()
                cur.nextset()
                row = cur.fetchone()
        except psycopg.errors.LockNotAvailable as exc:
            raise LakehouseConflictError(
                f"Iceberg table {namespace}.{name}: another effect held the table's pointer "
                f"for more than {wait:g} s (it commits a change to the table and has not "
                "ended); nothing of this effect was committed. Retry (Airflow retries this); "
                f"the catalog property {LOCK_TIMEOUT_PROPERTY!r} sets the wait"
            ) from exc
        self._locked = tuple(identifier)
        return None if row is None else row[0]

    def forget_lock(self) -> None:
        """The commit that took the lock ended without commit_table: the next one locks."""
        self._locked = None

    def lock_timeout(self) -> float:
        """How long a commit waits for the table's pointer held by another effect."""
        value = self.properties.get(LOCK_TIMEOUT_PROPERTY, DEFAULT_LOCK_TIMEOUT)
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = -1.0
        if not 0 < seconds <= 86400:
            raise ConfigurationError(
                f"eos.iceberg(): property {LOCK_TIMEOUT_PROPERTY!r} must be seconds between 0 "
                f"and 86400, got {value!r}"
            )
        return seconds

    def commit_table(
        self,
        table: Table,
        requirements: tuple[TableRequirement, ...],
        updates: tuple[TableUpdate, ...],
    ) -> CommitTableResponse:
        """pyiceberg's commit (its compare-and-swap UPDATE) in the effect's transaction, the
        pointer locked first: the swap cannot be lost to a concurrent commit; a change whose
        requirements no longer hold fails with pyiceberg's ``CommitFailedException``. The
        lock :class:`EffectTransaction` took just before is not taken twice."""
        if self._locked != tuple(table.name()):
            self.lock_pointer(table.name())
        self._locked = None
        response = _unwrapped(super().commit_table, table, requirements, updates)
        if self.eos is not None:  # the commit event names the snapshot the effect made
            self.eos.note("iceberg", ".".join(table.name()), response.metadata.current_snapshot_id)
        return response

    def create_table(self, *args: Any, **kwargs: Any) -> Table:
        return _unwrapped(super().create_table, *args, **kwargs)

    def create_namespace(self, *args: Any, **kwargs: Any) -> None:
        _unwrapped(super().create_namespace, *args, **kwargs)

    def namespace_exists(self, *args: Any, **kwargs: Any) -> bool:
        return _unwrapped(super().namespace_exists, *args, **kwargs)

    def purge_table(self, identifier: str | Identifier) -> None:
        raise ConfigurationError(
            "purge_table deletes files at once, before the effect commits; drop_table() "
            "inside the effect and delete the files after it committed"
        )

    @staticmethod
    def _delete_old_metadata(io: FileIO, base: TableMetadata, metadata: TableMetadata) -> None:
        """Keep old metadata files: the effect may still roll back to them."""


@contextlib.contextmanager
def lake_errors(name: str) -> Iterator[None]:
    """pyiceberg's errors for bad data and unreachable storage, as ours: data that does not
    fit the table's schema → :class:`ConfigurationError`; storage that refused or did not
    answer → :class:`LakehouseStorageError` (retryable)."""
    try:
        yield
    except EosError:
        raise
    except OSError as exc:
        text = " ".join(str(exc).split())[:400]
        raise LakehouseStorageError(
            f"Iceberg table {name}: the storage refused the request or could not be reached "
            f"({text}); nothing of this effect was committed. Check the warehouse and the "
            "catalog properties (s3.endpoint, credentials, region); Airflow retries this"
        ) from exc
    except ValueError as exc:
        text = " ".join(str(exc).split())
        if "Mismatch in fields" not in text and "more columns" not in text:
            raise
        raise ConfigurationError(
            f"Iceberg table {name}: the data does not match the table's schema "
            f"({text[:600]}); nothing was written. Write columns of the table's types, or "
            "evolve the schema first (table.update_schema() in the same effect)"
        ) from exc


class EffectTransaction(Transaction):
    """pyiceberg's table transaction, committed under the table's pointer lock: when the
    pointer moved since the table was read, the snapshot is rebuilt on the new metadata
    first (pyiceberg's own retry step, its data files kept). A change that concurrent
    commits invalidate ends in :class:`LakehouseConflictError`."""

    def _name(self) -> str:
        return ".".join(self._table.name())

    def _with_provenance(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``snapshot_properties`` plus the effect that writes the snapshot: its key,
        the ledger version it commits, the attempt and the run, so the table's history names
        the ledger entry of every snapshot (the ledger's result names the snapshot)."""
        eos = getattr(self._table.catalog, "eos", None)
        if eos is None:
            return kwargs
        provenance = {"eos.key": eos.key, "eos.attempt": str(eos.attempt)}
        if eos.origin.run_id is not None:
            provenance["eos.run-id"] = eos.origin.run_id
        if getattr(eos.session, "owner", None) is not None:
            entry = LedgerStore(eos.conn, eos.schema).entry(eos.key)
            if entry is not None:
                provenance["eos.version"] = str(entry.version + 1)
        given = kwargs.get("snapshot_properties") or {}
        return {**kwargs, "snapshot_properties": {**provenance, **given}}

    def append(self, *args: Any, **kwargs: Any) -> None:
        with lake_errors(self._name()):
            super().append(*args, **self._with_provenance(kwargs))

    def overwrite(self, *args: Any, **kwargs: Any) -> None:
        with lake_errors(self._name()):
            super().overwrite(*args, **self._with_provenance(kwargs))

    def dynamic_partition_overwrite(self, *args: Any, **kwargs: Any) -> None:
        with lake_errors(self._name()):
            super().dynamic_partition_overwrite(*args, **self._with_provenance(kwargs))

    def delete(self, *args: Any, **kwargs: Any) -> None:
        with lake_errors(self._name()):
            super().delete(*args, **self._with_provenance(kwargs))

    def commit_transaction(self) -> Table:
        table = self._table
        with lake_errors(self._name()):
            return self._commit_under_lock(table)

    def _commit_under_lock(self, table: Table) -> Table:
        try:
            if self._updates and isinstance(table.catalog, EffectCatalog):
                current = table.catalog.lock_pointer(table.name())
                rebuild = getattr(self, "_rebuild_snapshot_updates", None)
                moved = current is not None and current != table.metadata_location
                if moved and self._snapshot_producers and rebuild is not None:
                    table.refresh()
                    rebuild()
            return super().commit_transaction()
        except (CommitFailedException, ValidationException) as exc:
            if isinstance(table.catalog, EffectCatalog):
                table.catalog.forget_lock()
            raise LakehouseConflictError(
                f"Iceberg table {'.'.join(table.name())}: concurrent commits conflict with "
                f"this effect's change ({exc}); nothing of this effect was committed. Retry "
                "(Airflow retries this)"
            ) from exc


class EffectTable(Table):
    """A pyiceberg ``Table`` of :class:`EffectCatalog`: its commits join the effect."""

    def transaction(self) -> Transaction:
        return EffectTransaction(self)

    def update_schema(
        self, allow_incompatible_changes: bool = False, case_sensitive: bool = True
    ) -> UpdateSchema:
        return UpdateSchema(
            transaction=EffectTransaction(self, autocommit=True),
            allow_incompatible_changes=allow_incompatible_changes,
            case_sensitive=case_sensitive,
            name_mapping=self.name_mapping(),
        )

    def update_spec(self, case_sensitive: bool = True) -> UpdateSpec:
        return UpdateSpec(EffectTransaction(self, autocommit=True), case_sensitive=case_sensitive)

    def update_sort_order(self, case_sensitive: bool = True) -> UpdateSortOrder:
        return UpdateSortOrder(
            transaction=EffectTransaction(self, autocommit=True), case_sensitive=case_sensitive
        )

    def manage_snapshots(self) -> ManageSnapshots:
        return ManageSnapshots(transaction=EffectTransaction(self, autocommit=True))

    def update_statistics(self) -> UpdateStatistics:
        return UpdateStatistics(transaction=EffectTransaction(self, autocommit=True))


#: Settings of pyiceberg's configuration that name another catalog than the ledger's.
_NOT_OURS = frozenset({"uri", "type", "py-catalog-impl"})


def configured_properties() -> dict[str, str]:
    """What pyiceberg's configuration says of the catalog ``eos`` (a stock
    ``load_catalog("eos", uri=...)`` reads the same), without its location settings: the
    catalog is always the ledger's database."""
    from pyiceberg.utils.config import Config

    found = Config().get_catalog_config(CATALOG_NAME) or {}
    return {str(k): str(v) for k, v in found.items() if k not in _NOT_OURS}


def catalog_tables_exist(conn: psycopg.Connection[Any]) -> bool:
    names = [f"{CATALOG_SCHEMA}.{t}" for t in SqlCatalogBaseTable.metadata.tables]
    query = "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest(%s::text[]) AS n"
    return bool(_one(conn.execute(query, [names]).fetchone()))


def create_catalog_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """Create pyiceberg's catalog tables (schema ``public``) if missing, in ``conn``'s open
    transaction; returns their names (``db grant --iceberg``)."""
    if not catalog_tables_exist(conn):
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_CREATE_LOCK])
        _unwrapped(SqlCatalogBaseTable.metadata.create_all, engine_for(conn))
    return sorted(SqlCatalogBaseTable.metadata.tables)


def check_identifier(identifier: Any) -> tuple[str, ...]:
    """``"ns.table"`` or ``("ns", "table")`` (namespaces may nest) as a tuple; raises
    :class:`ConfigurationError` for anything else."""
    if isinstance(identifier, str):
        parts = tuple(identifier.split("."))
    elif isinstance(identifier, (tuple, list)) and all(isinstance(p, str) for p in identifier):
        parts = tuple(identifier)
    else:
        raise ConfigurationError(
            f"eos.iceberg(): the table identifier must be 'namespace.table' or a tuple of "
            f"strings, got {type(identifier).__name__}"
        )
    if len(parts) < 2 or not all(parts):
        raise ConfigurationError(
            f"eos.iceberg(): {identifier!r} is not 'namespace.table': the catalog keeps "
            "every table in a namespace"
        )
    if len(".".join(parts[:-1])) > _NAME_MAX or len(parts[-1]) > _NAME_MAX:
        raise ConfigurationError(
            f"eos.iceberg(): {identifier!r}: namespace and table names are limited to "
            f"{_NAME_MAX} characters"
        )
    return parts


def _check_schema(schema: Any) -> None:
    if schema is None or isinstance(schema, Schema):
        return
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigurationError(
            f"eos.iceberg() needs pyarrow ({exc}): pip install 'eos-airflow[lakehouse]'"
        ) from exc
    if not isinstance(schema, pa.Schema):
        raise ConfigurationError(
            "eos.iceberg(): schema= must be a pyarrow.Schema or a pyiceberg Schema, got "
            f"{type(schema).__name__}"
        )


def catalog(
    eos: Effect, warehouse: str | None = None, properties: Mapping[str, str] | None = None
) -> EffectCatalog:
    """The effect's catalog for these settings (one per effect and settings): pyiceberg's own
    configuration of the catalog ``eos`` (``.pyiceberg.yaml``, ``PYICEBERG_CATALOG__EOS__*``
    variables) under ``properties`` and ``warehouse``."""
    props = configured_properties()
    props.update({str(k): str(v) for k, v in (properties or {}).items()})
    if warehouse is not None:
        props["warehouse"] = warehouse
    key = tuple(sorted(props.items()))
    catalogs = eos.lakehouse_catalogs
    if key not in catalogs:
        catalogs[key] = EffectCatalog(eos.conn, **props)
        catalogs[key].eos = eos
    found = catalogs[key]
    assert isinstance(found, EffectCatalog)
    return found


def open_table(
    eos: Effect,
    identifier: str | tuple[str, ...],
    *,
    schema: Any = None,
    partition_spec: PartitionSpec | None = None,
    warehouse: str | None = None,
    properties: Mapping[str, str] | None = None,
) -> Table:
    """What ``eos.iceberg(...)`` calls: the table, created (with its namespace) from
    ``schema`` when missing; its commits join ``eos``'s transaction."""
    parts = check_identifier(identifier)
    name = ".".join(parts)
    _check_schema(schema)
    if partition_spec is not None and not isinstance(partition_spec, PartitionSpec):
        raise ConfigurationError(
            "eos.iceberg(): partition_spec= must be a pyiceberg PartitionSpec, got "
            f"{type(partition_spec).__name__}"
        )
    cat = catalog(eos, warehouse, properties)
    try:
        return cat.load_table(parts)
    except NoSuchTableError:
        pass
    if schema is None:
        raise ConfigurationError(
            f"Iceberg table {name!r} does not exist in catalog {CATALOG_NAME!r}: pass "
            "schema= (and warehouse=) to create it with the effect, or fix the name"
        ) from None
    if "warehouse" not in cat.properties:
        raise ConfigurationError(
            f"Iceberg table {name!r} does not exist: creating it needs warehouse= (where "
            "its files go, e.g. 'file:///data/lake' or 's3://bucket/lake')"
        )
    namespace = parts[:-1]
    try:
        if not cat.namespace_exists(namespace):
            cat.create_namespace(namespace)
    except (NamespaceAlreadyExistsError, IntegrityError, psycopg.errors.UniqueViolation):
        pass  # a concurrent effect created it and committed
    try:
        with lake_errors(name):
            return cat.create_table(
                parts, schema, partition_spec=partition_spec or UNPARTITIONED_PARTITION_SPEC
            )
    except TableAlreadyExistsError:
        return cat.load_table(parts)  # a concurrent effect created it and committed


def reader_uri(dsn: str) -> str:
    """The SQLAlchemy URI of the ledger's database for a stock reader:
    ``SqlCatalog("eos", uri=reader_uri(dsn), warehouse=...)``."""
    from sqlalchemy.engine import URL

    params = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    port = params.pop("port", None)
    host = params.pop("host", None)
    if host is not None and (host.startswith("/") or "," in host):
        # a Unix-socket directory (or several hosts) cannot be the URL's host: libpq takes
        # it from the query, with the port
        params["host"] = host
        if port:
            params["port"] = port
        host, port = None, None
    url = URL.create(
        "postgresql+psycopg",
        username=params.pop("user", None),
        password=params.pop("password", None),
        host=host,
        port=int(port) if port else None,
        database=params.pop("dbname", None),
        query=params,
    )
    return url.render_as_string(hide_password=False)
