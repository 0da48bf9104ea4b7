"""Adapters tier: ``ExactlyOnceTransferOperator``, a query's rows copied into a table once.

The rows are copied with COPY.

The work is :func:`eos_airflow.protocol.transfer.transfer` (see its module for modes, chunks
and visibility); this operator adds Airflow connections, templating and error mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eos_airflow.errors import ConfigurationError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.operators.base import ExactlyOnceBaseOperator
from eos_airflow.protocol.effect import Effect
from eos_airflow.protocol.transfer import check_options, transfer


class ExactlyOnceTransferOperator(ExactlyOnceBaseOperator):
    """Copy the rows of ``sql`` (on ``source_conn_id``) into ``table`` (on
    ``target_conn_id``, which holds the ledger) exactly once.

    :param source_conn_id: Airflow Postgres connection the query runs on.
    :param sql: the source query (templated); ``ORDER BY`` a unique key with
        ``chunk_rows``.
    :param target_conn_id: Airflow Postgres connection of the target table and ledger.
    :param table: target table, ``"table"`` or ``"schema.table"``; its columns receive the
        query's columns in order.
    :param mode: ``"append"`` or ``"replace"`` (delete ``replace_where``, then insert, in one
        transaction).
    :param replace_where: SQL condition of the rows ``replace`` removes (templated; use
        ``%(name)s`` placeholders with ``parameters``); ``None`` replaces the whole table.
    :param parameters: bind parameters for ``sql`` and ``replace_where`` (templated).
    :param key: effect key (templated); default ``{dag_id}/{task_id}/{run_id}/{map_index}``.
    :param chunk_rows: commit every N rows with a recovery point (see module docs).
    :param visibility: ``"chunks"`` or ``"atomic"`` (with ``chunk_rows``).
    :param on_committed: ``"skip"`` (default), ``"replace"`` (re-run and supersede, e.g.
        for backfills) or ``"fail"``.

    The parameters every exactly-once operator shares (``key``, ``on_committed``,
    ``ledger_schema``, ``wait_timeout``, ``max_result_bytes``) are those of
    :class:`~eos_airflow.operators.base.ExactlyOnceBaseOperator`.

    Returns ``{"rows", "table", "mode", "chunks", "format"}``, stored in the ledger.
    """

    template_fields: Sequence[str] = ("sql", "replace_where", "parameters", "table")
    fingerprint_fields: Sequence[str] = ("source_conn_id", "target_conn_id", "mode")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql", "replace_where": "sql", "parameters": "json"}
    ui_color = "#cde4ec"

    def __init__(
        self,
        *,
        source_conn_id: str,
        sql: str,
        target_conn_id: str,
        table: str,
        mode: str = "append",
        replace_where: str | None = None,
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        chunk_rows: int | None = None,
        visibility: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id=target_conn_id, **kwargs)
        if not source_conn_id:
            raise ConfigurationError(
                "source_conn_id is required: the Airflow connection the query runs on"
            )
        if not sql or not isinstance(sql, str):
            raise ConfigurationError("sql must be a non-empty SQL query string")
        check_options(mode, chunk_rows, visibility)
        self.source_conn_id = source_conn_id
        self.target_conn_id = target_conn_id
        self.sql = sql
        self.table = table
        self.mode = mode
        self.replace_where = replace_where
        self.parameters = parameters
        self.chunk_rows = chunk_rows
        self.visibility = visibility

    def execute(self, context: Any) -> Any:
        source = connect_factory(self.source_conn_id)
        source().close()  # an unknown or unreachable source fails before the claim

        def run(eos: Effect) -> dict[str, Any]:
            return transfer(
                eos,
                source,
                query=self.sql,
                table=self.table,
                mode=self.mode,
                replace_where=self.replace_where,
                parameters=self.parameters,
                chunk_rows=self.chunk_rows,
                visibility=self.visibility,
            )

        return self.run_effect(context, run)

    def openlineage_datasets(self) -> Any:
        """The source query's tables and the target table (OpenLineage)."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        from eos_airflow.operators.lineage import sql_lineage, table_dataset

        source = sql_lineage(self.source_conn_id, self.sql)
        return OperatorLineage(
            inputs=source.inputs,
            outputs=[table_dataset(self.target_conn_id, self.table)],
            run_facets=source.run_facets,
            job_facets=source.job_facets,
        )


__all__ = ["ExactlyOnceTransferOperator", "transfer"]
