"""Adapters tier: ``ExactlyOnceSQLOperator``, SQL committed with its ledger entry.

Templated SQL run in one transaction with the ledger's commit mark. It takes the arguments of
common.sql's ``SQLExecuteQueryOperator`` (``handler``, ``return_last``, ``split_statements``,
``hook_params``, ``show_return_value_in_logs``) with the same meaning, so a DAG switches by
changing the class name.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airflow.sdk.exceptions import AirflowFailException
from psycopg.rows import tuple_row

from eos_airflow.errors import ConfigurationError, ResultError
from eos_airflow.operators.base import ExactlyOnceBaseOperator
from eos_airflow.protocol.effect import Effect

#: ``hook_params`` that keep their meaning when the statements run on the effect's
#: connection (``DbApiHook``'s ``log_sql``: log each statement before it runs).
HOOK_PARAMS = ("log_sql",)


def split_statements(sql: str) -> list[str]:
    """Split one SQL string into statements exactly as common.sql's Postgres hook does
    (``DbApiHook.split_sql_string``: sqlparse, comments stripped, empty parts dropped)."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    return PostgresHook.split_sql_string(sql, strip_semicolon=PostgresHook.strip_semicolon)


def single_result(sql: str | Sequence[str], return_last: bool, split: bool | None) -> bool:
    """Whether common.sql returns one statement's result rather than a list of them."""
    from airflow.providers.common.sql.hooks.handlers import return_single_query_results

    return return_single_query_results(sql, return_last, split)


def storable(value: Any) -> Any:
    """The handler's result as stored in the ledger: rows (tuples) become lists, as they
    do in common.sql's JSON output; everything else must already be JSON."""
    if isinstance(value, tuple | list):
        return [storable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: storable(v) for k, v in value.items()}
    return value


def _first_non_json(value: Any, where: str = "result") -> str | None:
    """Where in ``value`` a value JSON cannot hold sits, and its type, or None."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} = {value!r} (float)"
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_non_json(item, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                return f"a key {k!r} ({type(k).__name__}) in {where}"
            found = _first_non_json(item, f"{where}[{k!r}]")
            if found:
                return found
        return None
    return f"{where} ({type(value).__name__})"


class ExactlyOnceSQLOperator(ExactlyOnceBaseOperator):
    """Run ``sql`` (one statement or a list) exactly once against ``conn_id``'s database.

    The statements and the ledger's commit mark share one transaction: a retry after a crash
    either finds the effect committed and skips, or finds nothing written and runs again.

    :param conn_id: Airflow Postgres connection of the target database (holds the ledger).
    :param sql: SQL string, list of strings, or a ``.sql`` file (templated).
    :param parameters: bind parameters for every statement (templated).
    :param key: effect key (templated); default ``{dag_id}/{task_id}/{run_id}/{map_index}``.
    :param on_committed: ``"skip"`` (default), ``"replace"`` or ``"fail"``.
    :param handler: as in ``SQLExecuteQueryOperator``: called with the cursor after each
        statement (e.g. ``fetch_all_handler``, ``fetch_one_handler``); the task returns what
        it returned. Default None: the task returns ``{"rowcounts": [...]}``.
    :param return_last: with a handler, return only the last statement's result (default
        True; a list of statements always returns a list, as in common.sql).
    :param split_statements: split a single SQL string into statements as common.sql does.
    :param hook_params: ``{"log_sql": bool}``; other hook settings do not apply, since the
        statements run on the effect's own connection.
    :param show_return_value_in_logs: log the result.
    :param database: accepted only as None; a different database needs its own connection.
    :param autocommit: accepted only as False: the statements commit with the ledger entry.

    The parameters every exactly-once operator shares (``key``, ``on_committed``,
    ``ledger_schema``, ``wait_timeout``, ``max_result_bytes``) are those of
    :class:`~eos_airflow.operators.base.ExactlyOnceBaseOperator`.

    Returns ``{"rowcounts": [...]}``, one count per statement, or with a handler what
    ``SQLExecuteQueryOperator`` returns (rows as lists), stored in the ledger and returned
    again, identical, by a run that skips. After a run, ``executed_statements`` lists the
    statements this try ran (empty after a skip).
    """

    template_fields: Sequence[str] = ("sql", "parameters")
    template_ext: Sequence[str] = (".sql", ".json")
    template_fields_renderers = {"sql": "sql", "parameters": "json"}
    ui_color = "#cdeccd"

    def __init__(
        self,
        *,
        conn_id: str,
        sql: str | Sequence[str],
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        handler: Callable[[Any], Any] | None = None,
        return_last: bool = True,
        split_statements: bool | None = None,
        hook_params: Mapping[str, Any] | None = None,
        show_return_value_in_logs: bool = False,
        database: str | None = None,
        autocommit: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id=conn_id, **kwargs)
        if not sql or (not isinstance(sql, str) and not all(isinstance(s, str) for s in sql)):
            raise ConfigurationError("sql must be a non-empty SQL string or a list of SQL strings")
        if handler is not None and not callable(handler):
            raise ConfigurationError(
                f"handler must be a function taking the cursor (e.g. fetch_all_handler from "
                f"airflow.providers.common.sql.hooks.handlers), got {type(handler).__name__}"
            )
        if database is not None:
            raise ConfigurationError(
                f"database={database!r} is not supported: the statements run in the database "
                f"of conn_id={conn_id!r}, which also holds the ledger, so that they commit "
                "together; create an Airflow connection for that database and pass it as conn_id"
            )
        if autocommit:
            raise ConfigurationError(
                "autocommit=True is not supported: the statements commit in one transaction "
                "with the ledger entry (that is what makes them run exactly once); drop it"
            )
        hook_params = dict(hook_params or {})
        unknown = sorted(set(hook_params) - set(HOOK_PARAMS))
        if unknown:
            raise ConfigurationError(
                f"hook_params {', '.join(map(repr, unknown))} not supported: the statements "
                f"run on the effect's connection to conn_id={conn_id!r}, not on a hook's own; "
                f"supported: {', '.join(HOOK_PARAMS)} (configure the connection itself, e.g. "
                "its extras, for the rest)"
            )
        self.sql = sql
        self.parameters = parameters
        self.handler = handler
        self.return_last = return_last
        self.split_statements = split_statements
        self.hook_params = hook_params
        self.show_return_value_in_logs = show_return_value_in_logs
        self.database = database
        self.autocommit = autocommit
        #: The statements the last try ran, in order (for lineage); empty after a skip.
        self.executed_statements: list[str] = []

    def prepare_template(self) -> None:
        """``parameters`` read from a ``.json`` file (as in common.sql) become a value."""
        if isinstance(self.parameters, str):
            self.parameters = ast.literal_eval(self.parameters)

    def statements(self) -> list[str]:
        """The statements to run: ``sql`` split as common.sql splits it."""
        if isinstance(self.sql, str):
            if self.split_statements:
                return split_statements(self.sql)
            return [self.sql] if self.sql.strip() else []
        return list(self.sql)

    def fingerprint_inputs(self, context: Any) -> dict[str, Any]:
        """Besides SQL and parameters, the result's shape where it differs from the default
        (so effects committed before these arguments existed keep their fingerprint)."""
        inputs = super().fingerprint_inputs(context)
        if self.handler is not None:
            inputs["handler"] = _qualified(self.handler)
            inputs["return_last"] = self.return_last
        if self.split_statements is not None:
            inputs["split_statements"] = self.split_statements
        return inputs

    def effect(self, statements: Sequence[str]) -> Callable[[Effect], Any]:
        """The effect function running ``statements`` on ``eos.conn`` and returning the
        result (``Ledger.run(key, op.effect(op.statements()))`` runs it outside Airflow)."""
        handler = self.handler
        # the hook's run() splits only when asked (its default is False), and the operator
        # returns what run() returned
        single = single_result(self.sql, self.return_last, bool(self.split_statements))
        log_sql = self.hook_params.get("log_sql", True)
        parameters = self.parameters
        if isinstance(parameters, list):
            parameters = tuple(parameters)

        def run_statements(eos: Effect) -> Any:
            self.executed_statements = []
            rowcounts: list[int] = []
            results: list[Any] = []
            with eos.conn.cursor(row_factory=tuple_row) as cur:
                for statement in statements:
                    if log_sql:
                        self.log.info(
                            "Running statement: %s, parameters: %s", statement, parameters
                        )
                    if parameters:
                        cur.execute(statement, parameters)
                    else:
                        cur.execute(statement)
                    self.executed_statements.append(statement)
                    rowcounts.append(cur.rowcount)
                    if handler is not None:
                        results.append(handler(cur))
            if handler is None:
                return {"rowcounts": rowcounts}
            return self._stored(results[-1] if single else results, handler)

        return run_statements

    def _stored(self, result: Any, handler: Callable[[Any], Any]) -> Any:
        value = storable(result)
        bad = _first_non_json(value)
        if bad is None:
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:  # e.g. a nesting JSON cannot hold
                bad = str(exc)
        if bad is not None:
            raise ResultError(
                f"the result of handler {_qualified(handler)} must be JSON to be stored in "
                f"the ledger, but {bad} is not; cast such columns in the SQL (e.g. "
                "amount::float, created_at::text) or pass a handler that returns plain data"
            )
        return value

    def execute(self, context: Any) -> Any:
        statements = self.statements()
        if not statements:
            raise AirflowFailException(
                "ConfigurationError: sql has no statements after rendering (empty, or only "
                "comments); pass the SQL to run"
            )
        self.executed_statements = []
        result = self.run_effect(context, self.effect(statements))
        if self.show_return_value_in_logs:
            self.log.info("Operator output is: %s", result)
        return result

    def openlineage_datasets(self) -> Any:
        """The tables the SQL reads and writes (OpenLineage; see operators/lineage.py)."""
        from eos_airflow.operators.lineage import sql_lineage

        assert self.conn_id is not None  # required by __init__
        return sql_lineage(self.conn_id, self.sql if isinstance(self.sql, str) else list(self.sql))


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
