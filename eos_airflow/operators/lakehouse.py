"""Adapters tier: ``ExactlyOnceIcebergOperator`` and ``ExactlyOnceDeltaOperator``, a query's
rows loaded into a lakehouse table once.

The source query streams as Arrow record batches (bounded memory) and the whole load is one
effect: one Iceberg snapshot committed with the ledger, or one Delta commit carrying the
effect's transaction marker (see eos_airflow/protocol/lakeload.py). Settings of the target
connection's ``extra``: ``iceberg_warehouse``, ``iceberg_properties`` (FileIO settings such
as ``{"s3.endpoint": ...}``) and ``delta_storage_options``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eos_airflow.errors import ConfigurationError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.operators.base import ExactlyOnceBaseOperator
from eos_airflow.protocol.effect import Effect
from eos_airflow.protocol.lakeload import (
    DEFAULT_BATCH_ROWS,
    MODES,
    check_partition_by,
    describe,
    record_batches,
    write_delta,
    write_iceberg,
)


def _check_common(mode: str, source_conn_id: str, sql: Any, batch_rows: Any) -> None:
    if mode not in MODES:
        raise ConfigurationError(
            f"mode={mode!r} is not valid; choose one of {', '.join(map(repr, MODES))}"
        )
    if not source_conn_id:
        raise ConfigurationError(
            "source_conn_id is required: the Airflow connection the query runs on"
        )
    if not sql or not isinstance(sql, str):
        raise ConfigurationError("sql must be a non-empty SQL query string")
    if not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or batch_rows < 1:
        raise ConfigurationError(f"batch_rows must be a positive integer, got {batch_rows!r}")


def _extra(conn_id: str) -> dict[str, Any]:
    """The ``extra`` of Airflow connection ``conn_id`` as a dict."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise ConfigurationError(
            f"Airflow connection {conn_id!r} is not defined; create it, e.g. "
            f"`airflow connections add {conn_id} --conn-uri postgresql://USER@HOST/DB`"
        ) from None
    return dict(connection.extra_dejson or {})


def _mapping(value: Any, what: str) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            pass
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{what} must be a dict of strings, got {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


class _LakehouseOperator(ExactlyOnceBaseOperator):
    """What both lakehouse operators share: the source query streamed as Arrow batches."""

    template_ext: Sequence[str] = (".sql",)
    ui_color = "#d7ecd0"

    def __init__(
        self,
        *,
        source_conn_id: str,
        sql: str,
        conn_id: str,
        mode: str = "append",
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        partition_by: str | Sequence[str] | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        iceberg: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id=conn_id, **kwargs)
        _check_common(mode, source_conn_id, sql, batch_rows)
        self.source_conn_id = source_conn_id
        self.sql = sql
        self.mode = mode
        self.parameters = parameters
        self.partition_by = check_partition_by(partition_by, iceberg=iceberg) or None
        self.batch_rows = batch_rows

    def _source_checked(self) -> Any:
        """The source's connection factory, after checking the query and its column types
        (before anything is claimed)."""
        source = connect_factory(self.source_conn_id)
        describe(source, self.sql, self.parameters)
        return source

    def openlineage_datasets(self) -> Any:
        """The source query's tables and the lakehouse table (OpenLineage)."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        from eos_airflow.operators.lineage import sql_lineage

        source = sql_lineage(self.source_conn_id, self.sql)
        target = self.lakehouse_dataset()
        return OperatorLineage(
            inputs=source.inputs,
            outputs=[target] if target is not None else [],
            run_facets=source.run_facets,
            job_facets=source.job_facets,
        )

    def lakehouse_dataset(self) -> Any:
        """The target table as an OpenLineage dataset (None while it does not exist)."""
        raise NotImplementedError

    def _target_extra(self) -> dict[str, Any]:
        assert self.conn_id is not None
        return _extra(self.conn_id)


class ExactlyOnceIcebergOperator(_LakehouseOperator):
    """Load the rows of ``sql`` (on ``source_conn_id``) into the Iceberg table ``table`` of
    the catalog ``"eos"`` in ``conn_id``'s database (which holds the ledger) exactly once,
    as one snapshot committed with the ledger.

    :param source_conn_id: Airflow Postgres connection the query runs on.
    :param sql: the source query (templated; a ``.sql`` file too).
    :param conn_id: Airflow Postgres connection of the ledger and the Iceberg catalog.
    :param table: ``"namespace.table"`` (templated); created from the query's columns when
        missing (needs a warehouse).
    :param mode: ``"append"`` or ``"overwrite"`` (the rows matching ``overwrite_filter`` are
        replaced by the query's rows in the same snapshot; without a filter, every row).
    :param overwrite_filter: pyiceberg filter string (templated), e.g.
        ``"order_date = '{{ ds }}'"``.
    :param warehouse: where a created table's files go (``file:///...``, ``s3://...``);
        default: the connection extra ``iceberg_warehouse``.
    :param properties: catalog / FileIO settings (``s3.endpoint``, ...), merged over the
        connection extra ``iceberg_properties``.
    :param partition_by: partitioning of a created table: columns or transforms
        (``"day(ordered_at)"``, ``"bucket(16, id)"``).
    :param parameters: bind parameters of ``sql`` (templated).
    :param batch_rows: rows fetched per Arrow record batch.

    With ``on_committed="replace"`` use ``mode="overwrite"`` (and a filter for the
    partition): a re-run then replaces its rows instead of adding them again.

    Returns ``{"rows", "batches", "table", "mode", "snapshot_id", "previous_snapshot_id",
    "files_added", "files_removed", "key"}``, stored in the ledger.
    """

    template_fields: Sequence[str] = ("sql", "table", "overwrite_filter", "parameters", "warehouse")
    fingerprint_fields: Sequence[str] = ("source_conn_id", "mode", "partition_by")
    template_fields_renderers = {"sql": "sql", "parameters": "json"}

    def __init__(
        self,
        *,
        source_conn_id: str,
        sql: str,
        conn_id: str,
        table: str,
        mode: str = "append",
        overwrite_filter: str | None = None,
        warehouse: str | None = None,
        properties: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            source_conn_id=source_conn_id,
            sql=sql,
            conn_id=conn_id,
            mode=mode,
            iceberg=True,
            **kwargs,
        )
        if not table or not isinstance(table, str):
            raise ConfigurationError("table is required: the Iceberg table, 'namespace.table'")
        if "{{" not in table and "." not in table:
            raise ConfigurationError(
                f"table={table!r} is not 'namespace.table': the catalog keeps every table in "
                "a namespace"
            )
        if overwrite_filter is not None and mode != "overwrite":
            raise ConfigurationError(
                "overwrite_filter selects the rows an overwrite replaces; use it with "
                "mode='overwrite'"
            )
        if self.on_committed == "replace" and mode != "overwrite":
            raise ConfigurationError(
                "on_committed='replace' with mode='append' would add the rows again on every "
                "re-run; use mode='overwrite' with overwrite_filter= selecting the rows the "
                "effect writes"
            )
        self.table = table
        self.overwrite_filter = overwrite_filter
        self.warehouse = warehouse
        self.properties = _mapping(properties, "properties")

    def execute(self, context: Any) -> Any:
        source = self._source_checked()
        extra = self._target_extra()
        properties = {
            **(_mapping(extra.get("iceberg_properties"), "iceberg_properties") or {}),
            **(self.properties or {}),
        }
        warehouse = self.warehouse or extra.get("iceberg_warehouse")

        def run(eos: Effect) -> dict[str, Any]:
            conn = source()
            try:
                reader = record_batches(conn, self.sql, self.parameters, batch_rows=self.batch_rows)
                return write_iceberg(
                    eos,
                    reader,
                    table=self.table,
                    mode=self.mode,
                    overwrite_filter=self.overwrite_filter,
                    warehouse=warehouse,
                    properties=properties,
                    partition_by=self.partition_by,
                )
            finally:
                conn.close()

        return self.run_effect(context, run)

    def lakehouse_dataset(self) -> Any:
        from eos_airflow.operators.lineage import iceberg_dataset

        assert self.conn_id is not None  # required by __init__
        warehouse = self.warehouse or _extra(self.conn_id).get("iceberg_warehouse")
        return iceberg_dataset(self.conn_id, self.table, warehouse)


class ExactlyOnceDeltaOperator(_LakehouseOperator):
    """Load the rows of ``sql`` (on ``source_conn_id``) into the Delta table at
    ``table_uri`` exactly once: one Delta commit carrying the effect's transaction marker,
    recorded in the ledger of ``conn_id``'s database.

    :param source_conn_id: Airflow Postgres connection the query runs on.
    :param sql: the source query (templated; a ``.sql`` file too).
    :param conn_id: Airflow Postgres connection of the ledger.
    :param table_uri: the table's location (templated): ``file:///...``, ``s3://...``; a
        missing table is created from the query's columns.
    :param mode: ``"append"`` or ``"overwrite"`` (of the rows matching ``predicate``, or of
        the whole table).
    :param predicate: SQL condition of the rows an overwrite replaces (templated), e.g.
        ``"order_date = '{{ ds }}'"``.
    :param storage_options: delta-rs storage options (``AWS_ENDPOINT_URL``, ...), merged over
        the connection extra ``delta_storage_options``.
    :param partition_by: partition columns of a created table.
    :param parameters: bind parameters of ``sql`` (templated).
    :param batch_rows: rows fetched per Arrow record batch.

    Returns ``{"rows", "batches", "table_uri", "mode", "delta_version", "written",
    "key"}``, stored in the ledger (``rows`` is None when an earlier try had written this
    version to Delta before it died).
    """

    template_fields: Sequence[str] = ("sql", "table_uri", "predicate", "parameters")
    fingerprint_fields: Sequence[str] = ("source_conn_id", "mode", "partition_by")
    template_fields_renderers = {"sql": "sql", "predicate": "sql", "parameters": "json"}

    def __init__(
        self,
        *,
        source_conn_id: str,
        sql: str,
        conn_id: str,
        table_uri: str,
        mode: str = "append",
        predicate: str | None = None,
        storage_options: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            source_conn_id=source_conn_id, sql=sql, conn_id=conn_id, mode=mode, **kwargs
        )
        if not table_uri or not isinstance(table_uri, str):
            raise ConfigurationError(
                "table_uri is required: the Delta table's location, e.g. 'file:///data/sales'"
            )
        if predicate is not None and mode != "overwrite":
            raise ConfigurationError(
                "predicate selects the rows an overwrite replaces; use it with mode='overwrite'"
            )
        if self.on_committed == "replace" and mode != "overwrite":
            raise ConfigurationError(
                "on_committed='replace' with mode='append' would add the rows again on every "
                "re-run; use mode='overwrite' with predicate= selecting the rows the effect "
                "writes"
            )
        if self.partition_by and any("(" in p for p in self.partition_by):
            raise ConfigurationError(
                "Delta partitions by column values: partition_by takes column names, not transforms"
            )
        self.table_uri = table_uri
        self.predicate = predicate
        self.storage_options = _mapping(storage_options, "storage_options")

    def execute(self, context: Any) -> Any:
        source = self._source_checked()
        extra = self._target_extra()
        options = {
            **(_mapping(extra.get("delta_storage_options"), "delta_storage_options") or {}),
            **(self.storage_options or {}),
        }

        def run(eos: Effect) -> dict[str, Any]:
            opened: list[Any] = []

            def batches() -> Any:
                conn = source()
                opened.append(conn)
                return record_batches(conn, self.sql, self.parameters, batch_rows=self.batch_rows)

            try:
                return write_delta(
                    eos,
                    batches,
                    table_uri=self.table_uri,
                    mode=self.mode,
                    predicate=self.predicate,
                    storage_options=options or None,
                    partition_by=self.partition_by,
                )
            finally:
                for conn in opened:
                    conn.close()

        return self.run_effect(context, run)

    def lakehouse_dataset(self) -> Any:
        from eos_airflow.operators.lineage import location_dataset

        return location_dataset(self.table_uri)


__all__ = ["ExactlyOnceDeltaOperator", "ExactlyOnceIcebergOperator"]
