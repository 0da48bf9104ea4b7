"""Adapters tier: ``LedgerSensor``: gate downstream work on committed effects (poke, reschedule,
deferrable)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue, conf
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout

from eos_airflow import config
from eos_airflow.errors import ConfigurationError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.ledger.keys import check_schema
from eos_airflow.ledger.watch import DEFAULT_POLL_INTERVAL, Verdict, WaitSpec, check
from eos_airflow.operators.retry import default_retry_policy
from eos_airflow.triggers.ledger import LedgerTrigger


class LedgerSensor(BaseSensorOperator):
    """Wait until effects are committed in the ledger of ``conn_id``'s database.

    Only committed effects count: a key whose transaction is still open, or rolled back,
    does not. Returns ``{key: stored result}`` of the committed keys (pushed as XCom).

    :param conn_id: Airflow Postgres connection of the database holding the ledger.
    :param key: an effect key or a list of keys (templated), e.g. ``"sales_daily/{{ ds }}"``;
        all must be committed.
    :param key_prefix: a key prefix (templated); at least ``min_count`` committed keys must
        start with it.
    :param wait_for_task: ``(dag_id, task_id)``: every map index of that task in the run
        ``wait_for_run_id`` (default: this run's id), by its default keys
        ``{dag_id}/{task_id}/{run_id}/{map_index}``. Give ``min_count`` (the number of map
        indexes; 1 for an unmapped task).
    :param wait_for_run_id: run id for ``wait_for_task`` (templated; default ``{{ run_id }}``).
    :param min_count: committed keys needed under the prefix (default 1).
    :param fail_on_failed: fail (without retries) when a key's last attempt failed; with
        ``False`` the sensor keeps waiting for a retry to commit it.
    :param ledger_schema: schema holding the ledger (default ``[eos_airflow] ledger_schema``,
        ``eos``).
    :param deferrable: wait in the triggerer (woken by NOTIFY) instead of a worker slot;
        default from ``[operators] default_deferrable``.
    :param trigger_poll_interval: seconds between the trigger's fallback polls.

    ``mode`` (``poke``/``reschedule``), ``poke_interval``, ``timeout`` and ``soft_fail`` work
    as for every sensor; a timeout fails the task, or skips it with ``soft_fail=True``.
    """

    template_fields: Sequence[str] = (
        *BaseSensorOperator.template_fields,
        "key",
        "key_prefix",
        "wait_for_run_id",
    )
    ui_color = "#cdeccd"

    def __init__(
        self,
        *,
        conn_id: str,
        key: str | Sequence[str] | None = None,
        key_prefix: str | None = None,
        wait_for_task: tuple[str, str] | None = None,
        wait_for_run_id: str = "{{ run_id }}",
        min_count: int | None = None,
        fail_on_failed: bool = True,
        ledger_schema: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        trigger_poll_interval: float = DEFAULT_POLL_INTERVAL,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        default_retry_policy(self)
        if not conn_id:
            raise ConfigurationError(
                "conn_id is required: the Airflow connection of the ledger database"
            )
        if key is None and key_prefix is None and wait_for_task is None:
            raise ConfigurationError(
                "give key= (a key or a list of keys), key_prefix= or "
                "wait_for_task=(dag_id, task_id)"
            )
        if key_prefix is not None and wait_for_task is not None:
            raise ConfigurationError(
                "key_prefix and wait_for_task both name a prefix; give one of them"
            )
        if wait_for_task is not None and (len(wait_for_task) != 2 or min_count is None):
            raise ConfigurationError(
                "wait_for_task takes (dag_id, task_id) and needs min_count= the "
                "number of its map indexes (1 for an unmapped task)"
            )
        if min_count is not None and min_count < 1:
            raise ConfigurationError(f"min_count must be >= 1, got {min_count}")
        self.conn_id = conn_id
        self.key = key
        self.key_prefix = key_prefix
        self.wait_for_task = tuple(wait_for_task) if wait_for_task else None
        self.wait_for_run_id = wait_for_run_id
        self.min_count = min_count
        self.fail_on_failed = fail_on_failed
        self.ledger_schema = check_schema(
            config.ledger_schema() if ledger_schema is None else ledger_schema
        )
        self.deferrable = deferrable
        self.trigger_poll_interval = trigger_poll_interval

    def spec(self) -> WaitSpec:
        """The wait, from the rendered template fields."""
        keys = [] if self.key is None else [self.key] if isinstance(self.key, str) else self.key
        prefix = self.key_prefix
        if self.wait_for_task is not None:
            dag_id, task_id = self.wait_for_task
            prefix = f"{dag_id}/{task_id}/{self.wait_for_run_id}/"
        return WaitSpec(
            keys=tuple(str(k) for k in keys),
            prefix=prefix,
            min_count=self.min_count or 1,
            fail_on_failed=self.fail_on_failed,
        )

    def check(self) -> Verdict:
        """Read the keys' states once (a blocking query: never from the triggerer). Its
        errors go to the retry policy: the database down or restarting is retried; an
        unknown connection, wrong credentials or a missing ledger schema fail at once."""
        conn = connect_factory(self.conn_id)()
        try:
            return check(conn, self.ledger_schema, self.spec())
        finally:
            conn.close()

    def poke(self, context: Any) -> PokeReturnValue:
        verdict = self.check()
        self.log.info("ledger: %s", verdict.message)
        return PokeReturnValue(self._finish(verdict), verdict.results)

    def _finish(self, verdict: Verdict) -> bool:
        if verdict.status == "failed" or verdict.status == "error":
            # a verdict on other tasks' effects, not an error of eos-airflow, so the retry
            # policy cannot classify it; a retry would only find the same failed key
            raise AirflowFailException(verdict.message)
        if verdict.status == "timeout":
            raise AirflowSensorTimeout(f"LedgerSensor {verdict.message}")
        return verdict.status == "committed"

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            return super().execute(context)
        verdict = self.check()
        if self._finish(verdict):
            self.log.info("ledger: %s; not deferring", verdict.message)
            return verdict.results
        self.log.info("ledger: %s; deferring", verdict.message)
        spec = self.spec()
        self.defer(
            trigger=LedgerTrigger(
                conn_id=self.conn_id,
                keys=list(spec.keys),
                prefix=spec.prefix,
                min_count=spec.min_count,
                schema=self.ledger_schema,
                poll_interval=self.trigger_poll_interval,
                fail_on_failed=self.fail_on_failed,
                deadline=time.time() + self.timeout,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> Any:
        """Resume from the trigger: return the results, or fail without retries."""
        if not event:
            raise AirflowFailException("LedgerTrigger fired without an event; clear the task")
        verdict = Verdict(
            event["status"],
            event.get("results") or {},
            event.get("missing") or [],
            event.get("failed") or [],
            event.get("message", ""),
        )
        self._finish(verdict)
        self.log.info("ledger: %s", verdict.message)
        return verdict.results
