"""``MultiTargetSQLOperator``, and what every several-database Airflow adapter shares.

``@task.exactly_once(targets=..., ledger_conn_id=..., protocol="2pc")`` and this operator run
their effect with :class:`~eos_airflow.multiledger.MultiLedger`: one open transaction
per target, committed atomically by two-phase (or three-phase) commit, with the decision
logged in the ledger of ``ledger_conn_id`` (docs/twophase.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator

from eos_airflow.errors import ConfigurationError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.operators.base import ExactlyOnceMixin
from eos_airflow.protocol.effect import MAX_RESULT_BYTES, Effect, Origin
from eos_airflow.protocol.local import DEFAULT_WAIT_TIMEOUT, Outcome
from eos_airflow.protocol.twophase import PROTOCOLS, check_targets

#: ``protocol=`` choices of the Airflow adapters: one database, or several.
PROTOCOL_CHOICES = ("local", *PROTOCOLS)


def check_multi(
    *,
    conn_id: str | None,
    targets: Mapping[str, str] | None,
    ledger_conn_id: str | None,
    protocol: str,
) -> None:
    """Validate the several-database arguments when the DAG is parsed (ValueError)."""
    if protocol not in PROTOCOL_CHOICES:
        raise ValueError(
            f"protocol={protocol!r} is not valid; choose one of "
            f"{', '.join(map(repr, PROTOCOL_CHOICES))}"
        )
    if protocol == "local":
        raise ValueError(
            "targets= (several databases) needs protocol='2pc' or '3pc'; "
            "for one database pass conn_id= instead"
        )
    if conn_id:
        raise ValueError(
            "pass either conn_id= (one database) or targets= (several), not both; "
            "the coordinator of several targets is ledger_conn_id="
        )
    if targets is None:
        raise ValueError(
            f"protocol={protocol!r} needs targets={{name: conn_id, ...}}: "
            "the Airflow connections of the databases written together"
        )
    try:
        check_targets(targets, protocol)
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from None
    if not all(isinstance(c, str) and c for c in targets.values()):
        raise ValueError("targets values must be Airflow connection ids (non-empty strings)")
    if not ledger_conn_id:
        raise ValueError(
            "ledger_conn_id is required with targets=: the Airflow connection "
            "whose ledger logs the commit decisions (it may be one of the targets)"
        )


def run_multi(
    op: ExactlyOnceMixin, key: str, fn: Callable[[Effect], Any], *, attempt: int, origin: Origin
) -> Outcome:
    """Run ``fn`` as ``op``'s effect across its targets (Airflow connections)."""
    from eos_airflow.multiledger import MultiLedger

    targets: dict[str, str] = op.targets  # type: ignore[attr-defined]
    ledger_conn_id: str = op.ledger_conn_id  # type: ignore[attr-defined]
    multi = MultiLedger(
        connect_factory(ledger_conn_id),
        {name: connect_factory(conn_id) for name, conn_id in targets.items()},
        protocol=op.protocol,  # type: ignore[attr-defined]
        schema=op.ledger_schema,
        conn_ids=targets,
        wait_timeout=op.wait_timeout,
        max_result_bytes=op.max_result_bytes,
    )
    try:
        return multi.run_outcome(
            key, fn, attempt=attempt, on_committed=op.on_committed, origin=origin
        )
    finally:
        multi.close()


class MultiTargetSQLOperator(ExactlyOnceMixin, BaseOperator):
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
        key: str | None = None,
        on_committed: str = "skip",
        ledger_schema: str = "eos",
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        max_result_bytes: int = MAX_RESULT_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._init_effect(
            conn_id=None,
            key=key,
            on_committed=on_committed,
            ledger_schema=ledger_schema,
            wait_timeout=wait_timeout,
            max_result_bytes=max_result_bytes,
            targets=targets,
            ledger_conn_id=ledger_conn_id,
            protocol=protocol,
        )
        if not isinstance(sql, Mapping) or set(sql) != set(targets):
            raise ValueError(
                f"sql must map every target ({', '.join(sorted(targets))}) to its SQL, e.g. "
                "sql={'a': 'UPDATE ...', 'b': ['INSERT ...', 'UPDATE ...']}"
            )
        for name, statements in sql.items():
            if not statements or (
                not isinstance(statements, str) and not all(isinstance(s, str) for s in statements)
            ):
                raise ValueError(
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


__all__ = ["MultiTargetSQLOperator", "PROTOCOL_CHOICES", "check_multi", "run_multi"]
