"""Adapters tier: ``ExactlyOnceBaseOperator``, what every exactly-once operator shares.

The effect key, the ledger connection (one database, or several targets committed by
two- or three-phase commit), ``on_committed``, the ledger's schema and bounds, their
validation when the DAG is parsed, and running the work as one effect whose errors Airflow's
retry policy sorts into permanent and retryable (eos_airflow/operators/retry.py). An operator
derives from :class:`ExactlyOnceBaseOperator`, takes its own parameters and passes the rest
on; its ``execute`` hands the work to :meth:`run_effect`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from airflow.sdk import BaseOperator

from eos_airflow import config
from eos_airflow.api import Ledger
from eos_airflow.errors import BadKeyError, ConfigurationError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.ledger.keys import check_schema
from eos_airflow.operators.retry import default_retry_policy
from eos_airflow.protocol.effect import Effect, Origin
from eos_airflow.protocol.local import Outcome
from eos_airflow.protocol.twophase import PROTOCOLS, check_targets
from eos_airflow.states import check_on_committed

#: Default effect key: retries and clears of one task instance are one effect.
DEFAULT_KEY = "{{ ti.dag_id }}/{{ ti.task_id }}/{{ ti.run_id }}/{{ ti.map_index }}"

#: ``protocol=`` choices of the Airflow adapters: one database, or several.
PROTOCOL_CHOICES = ("local", *PROTOCOLS)

_LOGICAL_DATE_FIELDS = (
    "ds",
    "ds_nodash",
    "ts",
    "ts_nodash",
    "logical_date",
    "data_interval_start",
    "data_interval_end",
)


def check_multi(
    *,
    conn_id: str | None,
    targets: Mapping[str, str] | None,
    ledger_conn_id: str | None,
    protocol: str,
) -> None:
    """Validate the several-database arguments when the DAG is parsed (ConfigurationError)."""
    if protocol not in PROTOCOL_CHOICES:
        raise ConfigurationError(
            f"protocol={protocol!r} is not valid; choose one of "
            f"{', '.join(map(repr, PROTOCOL_CHOICES))}"
        )
    if protocol == "local":
        raise ConfigurationError(
            "targets= (several databases) needs protocol='2pc' or '3pc'; "
            "for one database pass conn_id= instead"
        )
    if conn_id:
        raise ConfigurationError(
            "pass either conn_id= (one database) or targets= (several), not both; "
            "the coordinator of several targets is ledger_conn_id="
        )
    if targets is None:
        raise ConfigurationError(
            f"protocol={protocol!r} needs targets={{name: conn_id, ...}}: "
            "the Airflow connections of the databases written together"
        )
    check_targets(targets, protocol)
    if not all(isinstance(c, str) and c for c in targets.values()):
        raise ConfigurationError(
            "targets values must be Airflow connection ids (non-empty strings)"
        )
    if not ledger_conn_id:
        raise ConfigurationError(
            "ledger_conn_id is required with targets=: the Airflow connection "
            "whose ledger logs the commit decisions (it may be one of the targets)"
        )


@dataclass(frozen=True)
class SeveralTargets:
    """Where an effect across several databases runs: ``targets`` (name → Airflow connection
    id), the connection whose ledger logs the decisions, and ``"2pc"`` or ``"3pc"``."""

    targets: Mapping[str, str] | None
    ledger_conn_id: str | None
    protocol: str

    @classmethod
    def of(
        cls, targets: Mapping[str, str] | None, ledger_conn_id: str | None, protocol: str
    ) -> SeveralTargets | None:
        """The several-database arguments of an operator, or None for one database."""
        if protocol == "local" and targets is None:
            return None
        return cls(targets, ledger_conn_id, protocol)


class ExactlyOnceBaseOperator(BaseOperator):
    """Runs an operator's work as one effect in the ledger of ``conn_id``'s database, or
    across ``targets`` with the decisions logged in ``ledger_conn_id``'s ledger.

    :param conn_id: Airflow Postgres connection of the target database (holds the ledger).
    :param key: effect key (templated); default ``{dag_id}/{task_id}/{run_id}/{map_index}``.
    :param on_committed: ``"skip"`` (default), ``"replace"`` or ``"fail"``.
    :param ledger_schema: schema holding the ledger (default ``eos``).
    :param wait_timeout: seconds to wait for another live attempt of the key.
    :param max_result_bytes: bound on the stored result.
    :param several: instead of ``conn_id``, several databases committed atomically: what
        an operator that writes several (``MultiTargetSQLOperator``, ``@task.exactly_once``)
        builds from its ``targets``, ``ledger_conn_id`` and ``protocol`` parameters with
        :meth:`SeveralTargets.of`.

    ``on_committed``, ``ledger_schema``, ``wait_timeout`` and ``max_result_bytes`` left at
    None take their value from Airflow's configuration, section ``[eos_airflow]``
    (eos_airflow/config.py), when the DAG is parsed. ``retry_policy`` defaults to
    :class:`~eos_airflow.operators.retry.EosRetryPolicy`: eos-airflow's permanent errors
    fail the task at once, its retryable ones are retried.

    The key is rendered by :meth:`render_key` rather than as a template field, so that a key
    naming a value the run does not have (``{{ ds }}`` in a run without a logical date) fails
    with a message that says what to do, and fails before anything is claimed.
    """

    def __init__(
        self,
        *,
        conn_id: str | None = None,
        key: str | None = None,
        on_committed: str | None = None,
        ledger_schema: str | None = None,
        wait_timeout: float | None = None,
        max_result_bytes: int | None = None,
        several: SeveralTargets | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        default_retry_policy(self)
        on_committed = check_on_committed(
            config.on_committed() if on_committed is None else on_committed
        )
        if several is not None:
            check_multi(
                conn_id=conn_id,
                targets=several.targets,
                ledger_conn_id=several.ledger_conn_id,
                protocol=several.protocol,
            )
        elif not conn_id:
            raise ConfigurationError(
                "conn_id is required: the Airflow connection of the target database"
            )
        self.conn_id = conn_id
        self.targets = dict(several.targets) if several and several.targets is not None else None
        self.ledger_conn_id = several.ledger_conn_id if several else None
        self.protocol = several.protocol if several else "local"
        self.key = key
        self.on_committed = on_committed
        self.ledger_schema = check_schema(
            config.ledger_schema() if ledger_schema is None else ledger_schema
        )
        self.wait_timeout = config.wait_timeout() if wait_timeout is None else wait_timeout
        self.max_result_bytes = (
            config.max_result_bytes() if max_result_bytes is None else max_result_bytes
        )

    def render_key(self, context: Any) -> str:
        template = self.key or DEFAULT_KEY
        try:
            key = self.render_template(template, context)
        except jinja2.UndefinedError as exc:
            missing = [f for f in _LOGICAL_DATE_FIELDS if f"{f}" in template and f not in context]
            hint = (
                f"this run has no logical date, so {', '.join(missing)} is undefined: trigger "
                "the run with a logical date, or key by data the run has (e.g. {{ run_id }} "
                "or {{ params.day }})"
                if missing
                else "fix the template or pass the missing value as a param"
            )
            raise BadKeyError(
                f"effect key template {template!r} failed to render ({exc}); {hint}"
            ) from exc
        if not isinstance(key, str):
            key = str(key)
        return key

    def run_outcome(
        self, key: str, fn: Callable[[Effect], Any], *, attempt: int, origin: Origin
    ) -> Outcome:
        """Run ``fn`` as the effect ``key``: in ``conn_id``'s ledger, or across ``targets``."""
        if self.protocol != "local":
            return self._run_multi(key, fn, attempt=attempt, origin=origin)
        assert self.conn_id is not None  # __init__ requires it without targets
        ledger = Ledger(
            connect=connect_factory(self.conn_id),
            schema=self.ledger_schema,
            wait_timeout=self.wait_timeout,
            max_result_bytes=self.max_result_bytes,
        )
        try:
            return ledger.run_outcome(
                key, fn, attempt=attempt, on_committed=self.on_committed, origin=origin
            )
        finally:
            ledger.close()

    def _run_multi(
        self, key: str, fn: Callable[[Effect], Any], *, attempt: int, origin: Origin
    ) -> Outcome:
        from eos_airflow.multiledger import MultiLedger

        assert self.targets is not None and self.ledger_conn_id is not None  # check_multi
        multi = MultiLedger(
            connect_factory(self.ledger_conn_id),
            {name: connect_factory(conn_id) for name, conn_id in self.targets.items()},
            protocol=self.protocol,
            schema=self.ledger_schema,
            conn_ids=self.targets,
            wait_timeout=self.wait_timeout,
            max_result_bytes=self.max_result_bytes,
        )
        try:
            return multi.run_outcome(
                key, fn, attempt=attempt, on_committed=self.on_committed, origin=origin
            )
        finally:
            multi.close()

    def run_effect(self, context: Any, fn: Callable[[Effect], Any]) -> Any:
        """Run ``fn`` as this task's effect. Its errors reach Airflow as they are: the retry
        policy (EosRetryPolicy) fails the permanent ones at once and retries the others."""
        ti = context["ti"]
        origin = Origin(ti.dag_id, ti.task_id, ti.run_id, ti.map_index)
        key = self.render_key(context)
        outcome = self.run_outcome(key, fn, attempt=ti.try_number, origin=origin)
        if outcome.action == "skipped":
            self.log.info(
                "exactly-once: effect %r was committed already (version %s at %s); "
                "skipped the work and returned the stored result",
                key,
                outcome.version,
                outcome.committed_at,
            )
        else:
            self.log.info(
                "exactly-once: effect %r %s (version %s) by try %s",
                key,
                outcome.action,
                outcome.version,
                ti.try_number,
            )
        return outcome.result


__all__ = [
    "DEFAULT_KEY",
    "PROTOCOL_CHOICES",
    "ExactlyOnceBaseOperator",
    "SeveralTargets",
    "check_multi",
]
