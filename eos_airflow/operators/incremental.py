"""Adapters tier: ``IncrementalTableOperator``, a table's new rows copied exactly once.

The new rows are found by a monotonic column.

The Airflow adapter of :func:`eos_airflow.protocol.incremental.incremental`, whose module
documentation explains the position, the safe horizon, ``lag`` and ``chunk_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eos_airflow.errors import ConfigurationError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.operators.base import ExactlyOnceBaseOperator
from eos_airflow.protocol.effect import Effect
from eos_airflow.protocol.horizon import DEFAULT_HORIZON_TIMEOUT, HORIZONS, normalize_horizon
from eos_airflow.protocol.incremental import incremental


class IncrementalTableOperator(ExactlyOnceBaseOperator):
    """Copy the rows of ``source_table`` added since the last run into ``target_table``.

    :param source_conn_id: Airflow Postgres connection of the source table.
    :param source_table: ``"table"`` or ``"schema.table"``.
    :param column: monotonic column (a ``serial``/identity id, or an insert timestamp).
    :param target_conn_id: Airflow Postgres connection of the target (holds the ledger).
    :param target_table: ``"table"`` or ``"schema.table"``.
    :param columns: columns copied (same names on both sides); default all target columns.
    :param key: effect key (templated); default ``{dag_id}/{task_id}/{run_id}/{map_index}``.
    :param chunk_rows: commit every N rows with a recovery point (``column`` must be unique).
    :param horizon: ``"wait"`` (default) or ``"none"``; see the module documentation
        (``"xmin"``: deprecated alias of ``"wait"``).
    :param horizon_timeout: seconds to wait for source writers holding drawn sequence values.
    :param lag: keep the horizon this far below the largest visible value.
    :param offset_source: name of the position in ``eos.offsets`` (default
        ``table:<source_conn_id>/<source_table>``).

    The parameters every exactly-once operator shares (``key``, ``on_committed``,
    ``ledger_schema``, ``wait_timeout``, ``max_result_bytes``) are those of
    :class:`~eos_airflow.operators.base.ExactlyOnceBaseOperator`.

    Returns ``{"source", "from", "to", "rows", "visible", ...}``, stored in the ledger.
    """

    template_fields: Sequence[str] = ("source_table", "target_table")
    fingerprint_fields: Sequence[str] = ("source_conn_id", "column", "columns", "lag")
    ui_color = "#e4ecd0"

    def __init__(
        self,
        *,
        source_conn_id: str,
        source_table: str,
        column: str,
        target_conn_id: str,
        target_table: str,
        columns: Sequence[str] | None = None,
        chunk_rows: int | None = None,
        horizon: str = "wait",
        lag: Any = None,
        horizon_timeout: float = DEFAULT_HORIZON_TIMEOUT,
        offset_source: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id=target_conn_id, **kwargs)
        if horizon not in HORIZONS:
            horizon = normalize_horizon(horizon)  # a deprecated alias warns here
        if not isinstance(horizon_timeout, int | float) or horizon_timeout <= 0:
            raise ConfigurationError(
                f"horizon_timeout must be a number of seconds > 0, got {horizon_timeout!r}"
            )
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ConfigurationError(
                f"chunk_rows must be an integer >= 1 or None, got {chunk_rows!r}"
            )
        if not column:
            raise ConfigurationError(
                "column is required: the monotonic column that orders new rows"
            )
        self.source_conn_id = source_conn_id
        self.source_table = source_table
        self.column = column
        self.target_table = target_table
        self.columns = list(columns) if columns else None
        self.chunk_rows = chunk_rows
        self.horizon = horizon
        self.horizon_timeout = float(horizon_timeout)
        self.lag = lag
        self.offset_source = offset_source

    def execute(self, context: Any) -> Any:
        source = connect_factory(self.source_conn_id)
        source().close()  # an unknown or unreachable source fails before the claim
        name = self.offset_source or f"table:{self.source_conn_id}/{self.source_table}"

        def run(eos: Effect) -> dict[str, Any]:
            return incremental(
                eos,
                source,
                source_table=self.source_table,
                column=self.column,
                target_table=self.target_table,
                columns=self.columns,
                offset_source=name,
                horizon=self.horizon,
                lag=self.lag,
                chunk_rows=self.chunk_rows,
                horizon_timeout=self.horizon_timeout,
            )

        return self.run_effect(context, run)

    def openlineage_datasets(self) -> Any:
        """The source table and the target table (OpenLineage)."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        from eos_airflow.operators.lineage import table_dataset

        assert self.conn_id is not None  # required by __init__
        return OperatorLineage(
            inputs=[table_dataset(self.source_conn_id, self.source_table)],
            outputs=[table_dataset(self.conn_id, self.target_table)],
        )


__all__ = ["IncrementalTableOperator"]
