"""Adapters tier: OpenLineage for the exactly-once operators.

With ``apache-airflow-providers-openlineage`` installed and configured, Airflow asks each
task for its lineage when it ends (:meth:`LineageMixin.get_openlineage_facets_on_complete`):
the input and output datasets of the operator (:meth:`LineageMixin.openlineage_datasets`,
which each operator defines) and the run facet ``eos`` (key, version, action, attempt,
ledger connection) from the outcome :meth:`ExactlyOnceBaseOperator.run_effect` recorded.

Postgres datasets are named as the common.sql operators name them: namespace
``postgres://host:port``, name ``database.schema.table``; the source query's tables come from
the provider's SQL parser. Lakehouse tables are named by their location (``file`` or
``s3://bucket`` and the path), an Iceberg table with its catalog (``catalog`` and
``symlinks`` facets). Nothing here is imported unless the provider asks: importing
eos_airflow never needs it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.event_v2 import Dataset

    from eos_airflow.protocol.local import Outcome


class LineageMixin:
    """The OpenLineage methods of :class:`ExactlyOnceBaseOperator`."""

    #: The outcome of this task's effect, set by ``run_effect`` (None before, or on failure).
    _eos_outcome: Outcome | None = None

    def openlineage_datasets(self) -> OperatorLineage:
        """The operator's inputs and outputs (and the facets that describe them, such as
        the SQL job facet); none by default."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        return OperatorLineage()

    def eos_run_facets(self) -> dict[str, Any]:
        """``{"eos": EosRunFacet}`` of the recorded outcome, or ``{}`` without one."""
        outcome = self._eos_outcome
        if outcome is None:
            return {}
        from eos_airflow.operators.lineage_facet import EosRunFacet

        ledger = getattr(self, "conn_id", None) or getattr(self, "ledger_conn_id", None)
        committed_at = outcome.committed_at
        return {
            "eos": EosRunFacet(
                key=outcome.key,
                version=outcome.version,
                action=str(outcome.action),
                attempt=outcome.attempt,
                ledgerConnId=ledger,
                committedAt=committed_at.isoformat() if committed_at is not None else None,
            )
        }

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """What the OpenLineage provider reports when the task succeeds."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        found = self.openlineage_datasets()
        return OperatorLineage(
            inputs=found.inputs,
            outputs=found.outputs,
            run_facets={**found.run_facets, **self.eos_run_facets()},
            job_facets=found.job_facets,
        )

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> OperatorLineage:
        """What the OpenLineage provider reports when the task fails: the datasets, and the
        ``eos`` facet only if the effect had an outcome before the failure."""
        return self.get_openlineage_facets_on_complete(task_instance)


def _postgres(conn_id: str) -> tuple[Any, Any, Any]:
    """The Postgres hook of ``conn_id``, its connection and OpenLineage database info."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    hook = PostgresHook(postgres_conn_id=conn_id)
    connection = hook.get_connection(conn_id)
    return hook, connection, hook.get_openlineage_database_info(connection)


#: psycopg's bind placeholders (``%s``, ``%(name)s``) and its escaped ``%%``.
_PLACEHOLDER = re.compile(r"%\(\w+\)s|%s|%%")


def parseable(statement: str) -> str:
    """``statement`` with psycopg's placeholders as ``$n`` parameters, which the SQL parser
    reads (the statement's tables do not depend on the values bound)."""
    count = 0

    def number(found: re.Match[str]) -> str:
        nonlocal count
        if found.group() == "%%":
            return "%"
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, statement)


def current_schema(conn_id: str) -> str:
    """The schema unqualified names resolve to on ``conn_id`` (its ``search_path``); asked
    over a connection of its own, so the question is not itself reported as lineage."""
    from eos_airflow.hooks.ledger import connect_factory

    conn = connect_factory(conn_id)()
    try:
        row = conn.execute("SELECT current_schema()").fetchone()
    finally:
        conn.close()
    return str(row[0]) if row and row[0] else "public"


def sql_lineage(conn_id: str, sql: str | list[str]) -> OperatorLineage:
    """The tables ``sql`` reads and writes on ``conn_id``'s database, by the provider's SQL
    parser (as ``SQLExecuteQueryOperator`` reports them), with the ``sql`` job facet."""
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.providers.openlineage.sqlparser import SQLParser
    from airflow.providers.openlineage.utils.utils import should_use_external_connection
    from openlineage.client.facet_v2 import sql_job

    hook, connection, info = _postgres(conn_id)
    statements = [sql] if isinstance(sql, str) else list(sql)
    parser = SQLParser(
        dialect=hook.get_openlineage_database_dialect(connection),
        default_schema=current_schema(conn_id),
    )
    found = parser.generate_openlineage_metadata_from_sql(
        sql=[parseable(s) for s in statements],
        hook=hook,
        database_info=info,
        use_connection=should_use_external_connection(hook),
    )
    return OperatorLineage(
        inputs=found.inputs,
        outputs=found.outputs,
        run_facets=found.run_facets,
        job_facets={
            **found.job_facets,
            "sql": sql_job.SQLJobFacet(query=SQLParser.normalize_sql(statements)),
        },
    )


def table_dataset(conn_id: str, table: str) -> Dataset:
    """The Postgres table ``table`` (``"table"`` or ``"schema.table"``) of ``conn_id``."""
    from airflow.providers.openlineage.sqlparser import SQLParser
    from openlineage.client.event_v2 import Dataset

    _hook, _connection, info = _postgres(conn_id)
    parts = [p.strip('"') for p in table.split(".")]
    if len(parts) == 1:
        parts.insert(0, current_schema(conn_id))
    return Dataset(
        namespace=SQLParser.create_namespace(info), name=".".join([info.database, *parts])
    )


def location_dataset(uri: str, facets: dict[str, Any] | None = None) -> Dataset:
    """A lakehouse table named by its location, as OpenLineage names files: namespace
    ``file`` (local paths) or ``scheme://bucket``, name the path."""
    from openlineage.client.event_v2 import Dataset

    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        namespace, name = "file", parts.path
    else:
        namespace, name = f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")
    return Dataset(namespace=namespace, name=name.rstrip("/") or "/", facets=facets or {})


def iceberg_dataset(conn_id: str, table: str, warehouse: str | None) -> Dataset | None:
    """The Iceberg table ``table`` of the catalog ``eos`` in ``conn_id``'s database, named by
    its location, with ``catalog`` and ``symlinks`` facets naming it in the catalog; None
    while the table does not exist."""
    from airflow.providers.openlineage.sqlparser import SQLParser
    from openlineage.client.facet_v2 import catalog_dataset, symlinks_dataset
    from psycopg import sql

    from eos_airflow.hooks.ledger import connect_factory
    from eos_airflow.protocol.iceberg import CATALOG_NAME, CATALOG_SCHEMA

    _hook, _connection, info = _postgres(conn_id)
    *namespace, name = table.split(".")
    conn = connect_factory(conn_id)()
    try:
        row = conn.execute(
            sql.SQL(
                "SELECT metadata_location FROM {schema}.{table} WHERE catalog_name = %s "
                "AND table_namespace = %s AND table_name = %s"
            ).format(schema=sql.Identifier(CATALOG_SCHEMA), table=sql.Identifier("iceberg_tables")),
            [CATALOG_NAME, ".".join(namespace), name],
        ).fetchone()
    finally:
        conn.close()
    if row is None or not row[0]:
        return None
    location = str(row[0]).rsplit("/metadata/", 1)[0]
    catalog_uri = f"{SQLParser.create_namespace(info)}/{info.database}"
    return location_dataset(
        location,
        {
            "catalog": catalog_dataset.CatalogDatasetFacet(
                framework="iceberg",
                type="sql",
                name=CATALOG_NAME,
                metadataUri=catalog_uri,
                warehouseUri=warehouse,
                source="eos-airflow",
            ),
            "symlinks": symlinks_dataset.SymlinksDatasetFacet(
                identifiers=[
                    symlinks_dataset.Identifier(namespace=catalog_uri, name=table, type="TABLE")
                ]
            ),
        },
    )


__all__ = [
    "LineageMixin",
    "iceberg_dataset",
    "current_schema",
    "location_dataset",
    "parseable",
    "sql_lineage",
    "table_dataset",
]
