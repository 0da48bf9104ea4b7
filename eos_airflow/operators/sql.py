"""Adapters tier: ``ExactlyOnceSQLOperator``, SQL committed with its ledger entry.

Templated SQL run in one transaction with the ledger's commit mark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eos_airflow.errors import ConfigurationError
from eos_airflow.operators.base import ExactlyOnceBaseOperator
from eos_airflow.protocol.effect import Effect


class ExactlyOnceSQLOperator(ExactlyOnceBaseOperator):
    """Run ``sql`` (one statement or a list) exactly once against ``conn_id``'s database.

    The statements and the ledger's commit mark share one transaction: a retry after a crash
    either finds the effect committed and skips, or finds nothing written and runs again.

    :param conn_id: Airflow Postgres connection of the target database (holds the ledger).
    :param sql: SQL string, list of strings, or a ``.sql`` file (templated).
    :param parameters: bind parameters for every statement (templated).
    :param key: effect key (templated); default ``{dag_id}/{task_id}/{run_id}/{map_index}``.
    :param on_committed: ``"skip"`` (default), ``"replace"`` or ``"fail"``.

    The parameters every exactly-once operator shares (``key``, ``on_committed``,
    ``ledger_schema``, ``wait_timeout``, ``max_result_bytes``) are those of
    :class:`~eos_airflow.operators.base.ExactlyOnceBaseOperator`.

    Returns ``{"rowcounts": [...]}``, one count per statement, stored in the ledger.
    """

    template_fields: Sequence[str] = ("sql", "parameters")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql", "parameters": "json"}
    ui_color = "#cdeccd"

    def __init__(
        self,
        *,
        conn_id: str,
        sql: str | Sequence[str],
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id=conn_id, **kwargs)
        if not sql or (not isinstance(sql, str) and not all(isinstance(s, str) for s in sql)):
            raise ConfigurationError("sql must be a non-empty SQL string or a list of SQL strings")
        self.sql = sql
        self.parameters = parameters

    def execute(self, context: Any) -> Any:
        statements = [self.sql] if isinstance(self.sql, str) else list(self.sql)

        def run_statements(eos: Effect) -> dict[str, list[int]]:
            rowcounts = []
            for statement in statements:
                cursor = eos.conn.execute(statement, self.parameters)
                rowcounts.append(cursor.rowcount)
            return {"rowcounts": rowcounts}

        return self.run_effect(context, run_statements)

    def openlineage_datasets(self) -> Any:
        """The tables the SQL reads and writes (OpenLineage; see operators/lineage.py)."""
        from eos_airflow.operators.lineage import sql_lineage

        assert self.conn_id is not None  # required by __init__
        return sql_lineage(self.conn_id, self.sql if isinstance(self.sql, str) else list(self.sql))
