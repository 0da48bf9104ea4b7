"""Adapters tier: ``MultiTargetSQLOperator``, SQL on several databases committed atomically.

``@task.exactly_once(targets=..., ledger_conn_id=..., protocol="2pc")`` and this operator run
their effect with :class:`~eos_airflow.multiledger.MultiLedger`: one open transaction
per target, committed atomically by two-phase (or three-phase) commit, with the decision
logged in the ledger of ``ledger_conn_id`` (docs/twophase.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eos_airflow.errors import ConfigurationError
from eos_airflow.operators.base import (
    PROTOCOL_CHOICES,
    ExactlyOnceBaseOperator,
    SeveralTargets,
    check_multi,
)
from eos_airflow.protocol.effect import Effect


class MultiTargetSQLOperator(ExactlyOnceBaseOperator):
    """Run SQL on several databases exactly once, committed atomically (2PC or 3PC).

    :param targets: target name → Airflow Postgres connection id, e.g.
        ``{"a": "bank_a", "b": "bank_b"}`` (two or more).
    :param ledger_conn_id: connection whose ledger logs the decisions (may be a target).
    :param sql: target name → SQL string or list of strings (templated); every target
        named in ``targets`` needs an entry.
    :param parameters: bind parameters for every statement (templated).
    :param protocol: ``"2pc"`` (default) or ``"3pc"`` (docs/twophase.md says when).
    :param key: effect key (templated); default ``{dag_id}/{task_id}/{run_id}/{map_index}``.
    :param on_committed: ``"skip"`` (default), ``"replace"`` or ``"fail"``.

    The parameters every exactly-once operator shares (``key``, ``on_committed``,
    ``ledger_schema``, ``wait_timeout``, ``max_result_bytes``) are those of
    :class:`~eos_airflow.operators.base.ExactlyOnceBaseOperator`.

    Returns ``{"rowcounts": {target: [...]}}``, stored in the coordinator's ledger.
    """

    template_fields: Sequence[str] = ("sql", "parameters")
    template_fields_renderers = {"sql": "json", "parameters": "json"}
    ui_color = "#cde0ec"

    def __init__(
        self,
        *,
        targets: Mapping[str, str],
        ledger_conn_id: str,
        sql: Mapping[str, str | Sequence[str]],
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        protocol: str = "2pc",
        **kwargs: Any,
    ) -> None:
        # conn_id=None: a default_args conn_id meant for one-database tasks does not apply
        super().__init__(
            conn_id=None, several=SeveralTargets(targets, ledger_conn_id, protocol), **kwargs
        )
        if not isinstance(sql, Mapping) or set(sql) != set(targets):
            raise ConfigurationError(
                f"sql must map every target ({', '.join(sorted(targets))}) to its SQL, e.g. "
                "sql={'a': 'UPDATE ...', 'b': ['INSERT ...', 'UPDATE ...']}"
            )
        for name, statements in sql.items():
            if not statements or (
                not isinstance(statements, str) and not all(isinstance(s, str) for s in statements)
            ):
                raise ConfigurationError(
                    f"sql[{name!r}] must be a non-empty SQL string or a list of SQL strings"
                )
        self.sql = dict(sql)
        self.parameters = parameters

    def execute(self, context: Any) -> Any:
        def run_statements(eos: Effect) -> dict[str, dict[str, list[int]]]:
            rowcounts: dict[str, list[int]] = {}
            for name in sorted(self.sql):
                statements = self.sql[name]
                for statement in [statements] if isinstance(statements, str) else statements:
                    cursor = eos.conns[name].execute(statement, self.parameters)
                    rowcounts.setdefault(name, []).append(cursor.rowcount)
            return {"rowcounts": rowcounts}

        return self.run_effect(context, run_statements)


__all__ = ["MultiTargetSQLOperator", "PROTOCOL_CHOICES", "check_multi"]
