"""Protocol tier: a PostgreSQL query's rows streamed as Arrow record batches into an Iceberg or
Delta table, in one effect (what the lakehouse operators run).

The source query runs in a server-side cursor; rows are fetched ``batch_rows`` at a time and
converted to ``pyarrow.RecordBatch`` with a schema derived from the cursor's column types, so
memory stays bounded by a batch (and, for Iceberg, by one data file's worth of batches).

- Iceberg (:func:`write_iceberg`): every batch of the load becomes part of **one** snapshot
  (an append, or an overwrite that also removes the rows matching a filter), committed with
  the effect through ``eos.iceberg`` (protocol/iceberg.py).
- Delta (:func:`write_delta`): one ``eos.delta(...).write(...)`` of the stream, carrying
  Delta's transaction marker (protocol/delta.py); when an earlier attempt of this version
  wrote it already, the source query is not run again.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from eos_airflow.errors import ConfigurationError

if TYPE_CHECKING:
    from eos_airflow.protocol.effect import Effect

MODES = ("append", "overwrite")
#: Rows fetched from the source per Arrow record batch.
DEFAULT_BATCH_ROWS = 10_000
#: Arrow bytes gathered before they are written as Iceberg data files (bounds memory).
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
#: Largest precision Arrow's decimal128 holds.
_DECIMAL_MAX = 38
_CURSOR = "eos_lakeload"
_TRANSFORM = re.compile(r"^\s*(\w+)\s*\(\s*(?:(\d+)\s*,\s*)?(\w+)\s*\)\s*$")
_COLUMN = re.compile(r"^\s*(\w+)\s*$")


def _arrow() -> Any:
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - the lakehouse extra brings it
        raise ConfigurationError(
            f"the lakehouse operators need pyarrow ({exc}): pip install 'eos-airflow[lakehouse]'"
        ) from exc
    return pa


@dataclass(frozen=True)
class Column:
    """One source column: its name, PostgreSQL type and Arrow type, and how a fetched value
    becomes the Arrow value (None: as it is)."""

    name: str
    pg_type: str
    arrow: Any
    convert: Callable[[Any], Any] | None = None


def _float(value: Any) -> Any:
    return None if value is None else float(value)


def _text(value: Any) -> Any:
    return None if value is None else str(value)


def arrow_column(name: str, pg_type: str, precision: int | None, scale: int | None) -> Column:
    """The Arrow type of a column of PostgreSQL type ``pg_type`` (psycopg's type name);
    raises :class:`ConfigurationError` for a type without a sensible mapping."""
    pa = _arrow()
    simple = {
        "int2": pa.int16(),
        "int4": pa.int32(),
        "int8": pa.int64(),
        "float4": pa.float32(),
        "float8": pa.float64(),
        "bool": pa.bool_(),
        "text": pa.string(),
        "varchar": pa.string(),
        "bpchar": pa.string(),
        "name": pa.string(),
        "date": pa.date32(),
        "timestamp": pa.timestamp("us"),
        "timestamptz": pa.timestamp("us", tz="UTC"),
        "time": pa.time64("us"),
        "bytea": pa.binary(),
    }
    if pg_type in simple:
        return Column(name, pg_type, simple[pg_type])
    if pg_type in ("json", "jsonb", "uuid"):
        return Column(name, pg_type, pa.string(), _text)
    if pg_type == "numeric":
        if precision is not None and 0 < precision <= _DECIMAL_MAX:
            return Column(name, pg_type, pa.decimal128(precision, scale or 0))
        return Column(name, pg_type, pa.float64(), _float)
    raise ConfigurationError(
        f"source column {name!r} has PostgreSQL type {pg_type}, which has no Arrow mapping; "
        f"cast it in the query (e.g. {name}::text, {name}::numeric(18,2), {name}::timestamptz)"
    )


def columns_of(cursor: psycopg.Cursor[Any]) -> list[Column]:
    """The columns of an executed cursor, with their Arrow types."""
    if cursor.description is None:
        raise ConfigurationError("the source sql returns no rows (it is not a query); use SELECT")
    found: list[Column] = []
    seen: set[str] = set()
    for col in cursor.description:
        info = cursor.adapters.types.get(col.type_code)
        pg_type = info.name if info is not None else f"oid {col.type_code}"
        if col.name in seen:
            raise ConfigurationError(
                f"the source query returns column {col.name!r} twice; give each column its "
                "own name (… AS other_name)"
            )
        seen.add(col.name)
        found.append(arrow_column(col.name, pg_type, col.precision, col.scale))
    return found


def schema_of(columns: Sequence[Column]) -> Any:
    pa = _arrow()
    return pa.schema([pa.field(c.name, c.arrow, nullable=True) for c in columns])


def _declare(
    conn: psycopg.Connection[Any], query: str, parameters: Any
) -> psycopg.ServerCursor[Any]:
    from psycopg.rows import tuple_row
    from psycopg.types.string import TextLoader

    cursor = conn.cursor(name=_CURSOR, row_factory=tuple_row)
    for name in ("json", "jsonb"):  # the document's text, not Python objects
        cursor.adapters.register_loader(name, TextLoader)
    try:
        cursor.execute(query, parameters)
    except psycopg.errors.SyntaxError as exc:
        raise ConfigurationError(f"the source sql is not valid SQL: {exc}") from exc
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        raise ConfigurationError(f"the source sql names what does not exist: {exc}") from exc
    except psycopg.errors.ProgrammingError as exc:
        raise ConfigurationError(f"the source sql failed: {exc}") from exc
    return cursor


def describe(connect: Callable[[], psycopg.Connection[Any]], query: str, parameters: Any) -> Any:
    """The Arrow schema of ``query``'s rows, without fetching any (checks the query and its
    column types before anything is claimed or written)."""
    conn = connect()
    try:
        with conn.transaction(force_rollback=True):
            cursor = _declare(conn, query, parameters)
            try:
                return schema_of(columns_of(cursor))
            finally:
                cursor.close()
    finally:
        conn.close()


def record_batches(
    conn: psycopg.Connection[Any],
    query: str,
    parameters: Any = None,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Any:
    """``query``'s rows as a ``pyarrow.RecordBatchReader`` of at most ``batch_rows`` rows per
    batch, read from a server-side cursor in a read-only transaction on ``conn`` (which must
    not be in a transaction; the reader ends it when exhausted or closed)."""
    pa = _arrow()
    tx = conn.transaction()
    tx.__enter__()
    try:
        conn.execute("SET TRANSACTION READ ONLY")
        cursor = _declare(conn, query, parameters)
        columns = columns_of(cursor)
    except BaseException as exc:
        tx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    schema = schema_of(columns)

    def batches() -> Iterator[Any]:
        try:
            while True:
                rows = cursor.fetchmany(batch_rows)
                if not rows:
                    break
                arrays = []
                for i, col in enumerate(columns):
                    values = [row[i] for row in rows]
                    if col.convert is not None:
                        values = [col.convert(v) for v in values]
                    arrays.append(pa.array(values, type=col.arrow))
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)
            cursor.close()
        except BaseException as exc:
            tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        tx.__exit__(None, None, None)

    return pa.RecordBatchReader.from_batches(schema, batches())


class Counted:
    """A RecordBatchReader's batches, counting the rows that pass."""

    def __init__(self, reader: Any) -> None:
        self.rows = 0
        self.batches = 0
        self.schema = reader.schema
        self._reader = reader

    def __iter__(self) -> Iterator[Any]:
        for batch in self._reader:
            self.rows += batch.num_rows
            self.batches += 1
            yield batch

    def reader(self) -> Any:
        return _arrow().RecordBatchReader.from_batches(self.schema, iter(self))


def _chunks(batches: Iterator[Any], limit: int) -> Iterator[Any]:
    """The batches as pyarrow Tables of about ``limit`` bytes each (at least one batch)."""
    pa = _arrow()
    gathered: list[Any] = []
    size = 0
    for batch in batches:
        gathered.append(batch)
        size += batch.nbytes
        if size >= limit:
            yield pa.Table.from_batches(gathered)
            gathered, size = [], 0
    if gathered:
        yield pa.Table.from_batches(gathered)


def check_partition_by(partition_by: Any, *, iceberg: bool = False) -> list[str]:
    """``partition_by``: a column or (``iceberg``) a transform (``"day(ordered_at)"``,
    ``"bucket(16, id)"``), or a list of them."""
    if partition_by is None:
        return []
    items = [partition_by] if isinstance(partition_by, str) else partition_by
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigurationError(
            "partition_by must be a column name or a list of them (for Iceberg also "
            "transforms such as 'day(ordered_at)' or 'bucket(16, id)')"
        )
    for item in items:
        if not (_COLUMN.match(item) or _TRANSFORM.match(item)):
            raise ConfigurationError(
                f"partition_by entry {item!r} is not a column name or a transform such as "
                "'day(ordered_at)', 'month(ordered_at)', 'bucket(16, id)', 'truncate(4, name)'"
            )
    transforms = [i for i in items if _TRANSFORM.match(i)]
    if transforms and not iceberg:
        raise ConfigurationError(
            "Delta partitions by column values: partition_by takes column names, not "
            "transforms (select e.g. ordered_at::date AS order_date and partition by it)"
        )
    if transforms and importlib.util.find_spec("pyiceberg_core") is None:
        raise ConfigurationError(
            f"partition_by {transforms[0]!r}: pyiceberg writes transformed partitions "
            "with pyiceberg-core, which is not installed: pip install 'pyiceberg[pyiceberg-core]', "
            "or partition by a column (e.g. select ordered_at::date AS order_date and "
            "partition_by='order_date')"
        )
    return list(items)


def _partition_spec(schema: Any, partition_by: Sequence[str]) -> Any:
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import UnknownTransform, parse_transform

    fields = []
    for number, item in enumerate(partition_by):
        found = _TRANSFORM.match(item)
        if found:
            name, width, column = found.groups()
            transform = parse_transform(f"{name.lower()}[{width}]" if width else name.lower())
        else:
            column = item.strip()
            transform = parse_transform("identity")
        if isinstance(transform, UnknownTransform):
            raise ConfigurationError(
                f"partition_by {item!r}: unknown transform; use identity, year, month, day, "
                "hour, bucket(N, col) or truncate(W, col)"
            )
        try:
            source = schema.find_field(column)
        except ValueError:
            raise ConfigurationError(
                f"partition_by {item!r}: the query has no column {column!r}"
            ) from None
        label = column if not found else f"{column}_{name.lower()}"
        fields.append(
            PartitionField(
                source_id=source.field_id,
                field_id=1000 + number,
                transform=transform,
                name=label,
            )
        )
    return PartitionSpec(*fields)


def _iceberg_schema(arrow_schema: Any) -> Any:
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import assign_fresh_schema_ids

    return assign_fresh_schema_ids(Catalog._convert_schema_if_needed(arrow_schema))


def _provenance(eos: Effect) -> dict[str, str]:
    """The snapshot summary's note of the effect that writes it (as ``eos.iceberg``'s own
    appends and overwrites carry): key, attempt, run and the ledger version it commits."""
    from eos_airflow.ledger.store import LedgerStore

    found = {"eos.key": eos.key, "eos.attempt": str(eos.attempt)}
    if eos.origin.run_id is not None:
        found["eos.run-id"] = eos.origin.run_id
    if getattr(eos.session, "owner", None) is not None:
        entry = LedgerStore(eos.conn, eos.schema).entry(eos.key)
        if entry is not None:
            found["eos.version"] = str(entry.version + 1)
    return found


def write_iceberg(
    eos: Effect,
    reader: Any,
    *,
    table: str,
    mode: str = "append",
    overwrite_filter: str | None = None,
    warehouse: str | None = None,
    properties: Mapping[str, str] | None = None,
    partition_by: Sequence[str] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Write ``reader``'s batches into the Iceberg table ``table`` as one snapshot committed
    with ``eos``: ``"append"``, or ``"overwrite"`` (the rows matching ``overwrite_filter``, a
    pyiceberg filter string, or every row when it is None, are removed in the same
    snapshot). The table is created from the reader's schema (partitioned by
    ``partition_by``) when missing.

    Returns ``{"rows", "table", "mode", "snapshot_id", "previous_snapshot_id",
    "files_added", "files_removed", "key"}``."""
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.expressions.parser import parse
    from pyiceberg.expressions.visitors import (
        ROWS_MUST_MATCH,
        _StrictMetricsEvaluator,
        bind,
    )
    from pyiceberg.io.pyarrow import (
        ArrowScan,
        _check_pyarrow_schema_compatible,
        _dataframe_to_data_files,
        _expression_to_complementary_pyarrow,
    )

    from eos_airflow.protocol.iceberg import lake_errors

    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    schema = _iceberg_schema(reader.schema)
    spec = (
        _partition_spec(schema, check_partition_by(partition_by, iceberg=True))
        if partition_by
        else None
    )
    tbl = eos.iceberg(
        table, schema=schema, partition_spec=spec, warehouse=warehouse, properties=properties
    )
    try:
        _check_pyarrow_schema_compatible(
            tbl.schema(), reader.schema, format_version=tbl.metadata.format_version
        )
    except ValueError as exc:
        raise ConfigurationError(
            f"Iceberg table {table!r}: the query's columns do not match the table's schema "
            f"({' '.join(str(exc).split())[:600]}); nothing was written. Select the table's "
            "columns with their types (cast in the query), or change the table's schema"
        ) from exc
    expr: Any = AlwaysTrue()
    if mode == "overwrite" and overwrite_filter:
        try:
            expr = parse(overwrite_filter)
            bind(tbl.schema(), expr, case_sensitive=True)
        except Exception as exc:
            raise ConfigurationError(
                f"overwrite_filter {overwrite_filter!r} is not a filter on table {table!r} "
                f"({exc}); write it like \"order_date = '2026-12-01'\" or "
                "\"ordered_at >= '2026-12-01T00:00:00+00:00'\""
            ) from exc
    previous = tbl.current_snapshot()
    counted = Counted(reader)
    removed = 0
    txn = tbl.transaction()
    properties_of_snapshot = _provenance(eos)
    update = txn.update_snapshot(snapshot_properties=properties_of_snapshot)
    producer = update.overwrite() if mode == "overwrite" else update.fast_append()
    counter = itertools.count(0)
    with lake_errors(".".join(tbl.name())), producer:
        meta = txn.table_metadata
        if mode == "overwrite" and previous is not None:
            producer.delete_by_predicate(expr)
            current = meta.schema()
            strict = _StrictMetricsEvaluator(current, expr).eval
            for task in tbl.scan(row_filter=expr).plan_files():
                if strict(task.file) == ROWS_MUST_MATCH and not task.delete_files:
                    producer.delete_data_file(task.file)
                    removed += 1
                    continue
                rows = ArrowScan(meta, tbl.io, current, AlwaysTrue()).to_table(tasks=[task])
                bound = bind(current, expr, case_sensitive=True)
                kept = rows.filter(_expression_to_complementary_pyarrow(bound, current))
                if kept.num_rows == rows.num_rows:
                    continue
                producer.delete_data_file(task.file)
                removed += 1
                if kept.num_rows:
                    for data_file in _dataframe_to_data_files(
                        meta, kept, tbl.io, producer.commit_uuid, counter
                    ):
                        producer.append_data_file(data_file)
        added = 0
        for chunk in _chunks(iter(counted), chunk_bytes):
            for data_file in _dataframe_to_data_files(
                meta, chunk, tbl.io, producer.commit_uuid, counter
            ):
                producer.append_data_file(data_file)
                added += 1
    committed = txn.commit_transaction()
    snapshot = committed.current_snapshot()
    return {
        "rows": counted.rows,
        "batches": counted.batches,
        "table": ".".join(tbl.name()),
        "mode": mode,
        "snapshot_id": snapshot.snapshot_id if snapshot is not None else None,
        "previous_snapshot_id": previous.snapshot_id if previous is not None else None,
        "files_added": added,
        "files_removed": removed,
        "key": eos.key,
    }


def write_delta(
    eos: Effect,
    source: Callable[[], Any],
    *,
    table_uri: str,
    mode: str = "append",
    predicate: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    partition_by: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write the batches of ``source()`` (a function returning a RecordBatchReader, called
    only when this effect version is not in the table yet) into the Delta table at
    ``table_uri`` with ``eos.delta(...)``.

    Returns ``{"rows", "table_uri", "mode", "delta_version", "written", "key"}`` (``rows``
    is None when an earlier attempt of this version had written it)."""
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    columns = check_partition_by(partition_by)
    target = eos.delta(table_uri, storage_options=storage_options)
    write = target.prepare(mode=mode, predicate=predicate, partition_by=columns or None)
    counted: Counted | None = None
    if write.done_already:
        result = write.commit(None)
    else:
        counted = Counted(source())
        result = write.commit(counted.reader())
    return {
        "rows": counted.rows if counted is not None else None,
        "batches": counted.batches if counted is not None else None,
        "table_uri": result["table_uri"],
        "mode": mode,
        "delta_version": result["delta_version"],
        "written": result["written"],
        "key": eos.key,
    }


__all__ = [
    "DEFAULT_BATCH_ROWS",
    "MODES",
    "Column",
    "arrow_column",
    "check_partition_by",
    "columns_of",
    "describe",
    "record_batches",
    "write_delta",
    "write_iceberg",
]
