"""What every exactly-once operator shares: effect key, ledger, and Airflow error mapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from airflow.sdk.exceptions import AirflowFailException

from eos_airflow.api import Ledger
from eos_airflow.errors import BadKeyError, EosError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.ledger.keys import check_schema
from eos_airflow.protocol.effect import Effect, Origin
from eos_airflow.states import check_on_committed

#: Default effect key: retries and clears of one task instance are one effect.
DEFAULT_KEY = "{{ ti.dag_id }}/{{ ti.task_id }}/{{ ti.run_id }}/{{ ti.map_index }}"

_LOGICAL_DATE_FIELDS = (
    "ds",
    "ds_nodash",
    "ts",
    "ts_nodash",
    "logical_date",
    "data_interval_start",
    "data_interval_end",
)


class ExactlyOnceMixin:
    """Runs an operator's work as one effect in the ledger of ``conn_id``'s database.

    The key is rendered here rather than as a template field, so that a key naming a value
    the run does not have (``{{ ds }}`` in a run without a logical date) fails with a message
    that says what to do, and fails before anything is claimed.
    """

    conn_id: str
    key: str | None
    on_committed: str
    ledger_schema: str
    wait_timeout: float
    max_result_bytes: int

    def _init_effect(
        self,
        *,
        conn_id: str | None,
        key: str | None,
        on_committed: str,
        ledger_schema: str,
        wait_timeout: float,
        max_result_bytes: int,
        targets: Mapping[str, str] | None = None,
        ledger_conn_id: str | None = None,
        protocol: str = "local",
    ) -> None:
        on_committed = check_on_committed(on_committed)
        if protocol != "local" or targets is not None:
            from eos_airflow.operators.multi import check_multi

            check_multi(
                conn_id=conn_id, targets=targets, ledger_conn_id=ledger_conn_id, protocol=protocol
            )
        elif not conn_id:
            raise ValueError("conn_id is required: the Airflow connection of the target database")
        self.targets = dict(targets) if targets is not None else None
        self.ledger_conn_id = ledger_conn_id
        self.protocol = protocol
        self.conn_id = conn_id  # type: ignore[assignment]
        self.key = key
        self.on_committed = on_committed
        self.ledger_schema = check_schema(ledger_schema)
        self.wait_timeout = wait_timeout
        self.max_result_bytes = max_result_bytes

    def render_key(self, context: Any) -> str:
        template = self.key or DEFAULT_KEY
        try:
            key = self.render_template(template, context)  # type: ignore[attr-defined]
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

    def run_effect(self, context: Any, fn: Callable[[Effect], Any]) -> Any:
        """Run ``fn`` as this task's effect; permanent errors do not get retried."""
        ti = context["ti"]
        origin = Origin(ti.dag_id, ti.task_id, ti.run_id, ti.map_index)
        log = self.log  # type: ignore[attr-defined]
        try:
            key = self.render_key(context)
            if getattr(self, "protocol", "local") != "local":
                from eos_airflow.operators.multi import run_multi

                outcome = run_multi(self, key, fn, attempt=ti.try_number, origin=origin)
            else:
                ledger = Ledger(
                    connect=connect_factory(self.conn_id),
                    schema=self.ledger_schema,
                    wait_timeout=self.wait_timeout,
                    max_result_bytes=self.max_result_bytes,
                )
                try:
                    outcome = ledger.run_outcome(
                        key,
                        fn,
                        attempt=ti.try_number,
                        on_committed=self.on_committed,
                        origin=origin,
                    )
                finally:
                    ledger.close()
        except EosError as exc:
            if exc.retryable:
                raise
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        if outcome.action == "skipped":
            log.info(
                "exactly-once: effect %r was committed already (version %s at %s); "
                "skipped the work and returned the stored result",
                key,
                outcome.version,
                outcome.committed_at,
            )
        else:
            log.info(
                "exactly-once: effect %r %s (version %s) by try %s",
                key,
                outcome.action,
                outcome.version,
                ti.try_number,
            )
        return outcome.result


__all__ = ["DEFAULT_KEY", "ExactlyOnceMixin"]
