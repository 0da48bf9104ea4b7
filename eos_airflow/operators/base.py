"""Adapters tier: ``ExactlyOnceBaseOperator``, what every exactly-once operator shares.

The effect key, the ledger connection (one database, or several targets committed by
two- or three-phase commit), ``on_committed``, the ledger's schema and bounds, their
validation when the DAG is parsed, and running the work as one effect whose errors Airflow's
retry policy sorts into permanent and retryable (eos_airflow/operators/retry.py). An operator
derives from :class:`ExactlyOnceBaseOperator`, takes its own parameters and passes the rest
on; its ``execute`` hands the work to :meth:`run_effect`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import jinja2
from airflow.sdk import BaseOperator, conf
from airflow.sdk.exceptions import AirflowFailException

from eos_airflow import config
from eos_airflow.api import Ledger
from eos_airflow.errors import BadKeyError, ConfigurationError, KeyInProgressError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.ledger.keys import check_schema
from eos_airflow.operators.lineage import LineageMixin
from eos_airflow.operators.retry import default_retry_policy
from eos_airflow.protocol.effect import Effect, Origin
from eos_airflow.protocol.fingerprints import fingerprint as make_fingerprint
from eos_airflow.protocol.local import Outcome
from eos_airflow.protocol.twophase import PROTOCOLS, check_targets
from eos_airflow.states import check_on_committed, check_on_mismatch

#: Default effect key: retries and clears of one task instance are one effect.
DEFAULT_KEY = "{{ ti.dag_id }}/{{ ti.task_id }}/{{ ti.run_id }}/{{ ti.map_index }}"
#: Default effect key of a run with a partition key (Airflow 3.2+ partitioned runs): every
#: run for the same partition is the same effect.
PARTITION_KEY = "{{ ti.dag_id }}/{{ ti.task_id }}/{{ partition_key }}/{{ ti.map_index }}"

#: Deferrable tasks wait this long in the worker for another live run of the key before they
#: defer (most holders finish within it: a deferral costs a triggerer round trip).
DEFER_AFTER = 5.0

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


class ExactlyOnceBaseOperator(LineageMixin, BaseOperator):
    """Runs an operator's work as one effect in the ledger of ``conn_id``'s database, or
    across ``targets`` with the decisions logged in ``ledger_conn_id``'s ledger.

    :param conn_id: Airflow Postgres connection of the target database (holds the ledger).
    :param key: effect key (templated); default ``{dag_id}/{task_id}/{run_id}/{map_index}``.
    :param on_committed: ``"skip"`` (default), ``"replace"`` or ``"fail"``.
    :param ledger_schema: schema holding the ledger (default ``eos``).
    :param wait_timeout: seconds to wait for another live attempt of the key.
    :param max_result_bytes: bound on the stored result.
    :param on_mismatch: when the key is committed from other inputs than this run's
        (their fingerprint differs: changed SQL, arguments or code): ``"warn"`` (default:
        skip, warn, record a ``mismatch`` event), ``"fail"`` (FingerprintMismatchError, not
        retried) or ``"replace"`` (write a new version).
    :param deferrable: when another live run holds the key, do not wait in the worker slot:
        after at most ``DEFER_AFTER`` seconds the task defers to the triggerer, which wakes it
        when the key is committed or released (or after ``wait_timeout``, at least a minute,
        to look again); it then claims, skips or replaces as usual. Default from
        ``[operators] default_deferrable``; without it the worker waits up to
        ``wait_timeout`` and fails with the retryable KeyInProgressError.
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

    The effect's input fingerprint (:meth:`fingerprint_inputs`) covers the operator's class,
    its rendered template fields and the attributes named in ``fingerprint_fields``.

    With ``outlets``, the task reports its asset events once per committed version: the
    success that first reports a version (a commit, a replace, or the retry that skips
    right after its own earlier try committed) carries ``extra["eos"]`` = key, version and
    action; later skips report none (docs/usage.md, "Assets").
    """

    #: Attributes besides the template fields that make up the effect's inputs.
    fingerprint_fields: Sequence[str] = ()

    def __init__(
        self,
        *,
        conn_id: str | None = None,
        key: str | None = None,
        on_committed: str | None = None,
        ledger_schema: str | None = None,
        wait_timeout: float | None = None,
        max_result_bytes: int | None = None,
        on_mismatch: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        several: SeveralTargets | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        default_retry_policy(self)
        on_committed = check_on_committed(
            config.on_committed() if on_committed is None else on_committed
        )
        self.on_mismatch = check_on_mismatch(
            config.on_mismatch() if on_mismatch is None else on_mismatch
        )
        self.deferrable = deferrable
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
        template = self.key or (PARTITION_KEY if context.get("partition_key") else DEFAULT_KEY)
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

    def fingerprint_inputs(self, context: Any) -> dict[str, Any]:
        """What this task's effect is made from, for its input fingerprint: the operator's
        class, its rendered template fields and the ``fingerprint_fields``."""
        kind = type(self)
        names = (*self.template_fields, *self.fingerprint_fields)
        return {
            "operator": f"{kind.__module__}.{kind.__qualname__}",
            **{name: getattr(self, name, None) for name in names},
        }

    def run_outcome(
        self,
        key: str,
        fn: Callable[[Effect], Any],
        *,
        attempt: int,
        origin: Origin,
        fingerprint: str | None = None,
        announce: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Run ``fn`` as the effect ``key``: in ``conn_id``'s ledger, or across ``targets``.
        With ``announce`` (the announcement's detail), also record the outcome's version as
        announced; the returned outcome's ``announced`` says whether this call did."""
        if self.protocol != "local":
            return self._run_multi(
                key, fn, attempt=attempt, origin=origin, fingerprint=fingerprint, announce=announce
            )
        assert self.conn_id is not None  # __init__ requires it without targets
        ledger = Ledger(
            connect=connect_factory(self.conn_id),
            schema=self.ledger_schema,
            wait_timeout=self._worker_wait(),
            max_result_bytes=self.max_result_bytes,
        )
        try:
            outcome = ledger.run_outcome(
                key,
                fn,
                attempt=attempt,
                on_committed=self.on_committed,
                origin=origin,
                fingerprint=fingerprint,
                on_mismatch=self.on_mismatch,
            )
            if announce is not None:
                outcome = _announced(
                    outcome, ledger.announce(key, outcome.version, attempt, announce)
                )
            return outcome
        finally:
            ledger.close()

    def _run_multi(
        self,
        key: str,
        fn: Callable[[Effect], Any],
        *,
        attempt: int,
        origin: Origin,
        fingerprint: str | None = None,
        announce: Mapping[str, Any] | None = None,
    ) -> Outcome:
        from eos_airflow.multiledger import MultiLedger

        assert self.targets is not None and self.ledger_conn_id is not None  # check_multi
        multi = MultiLedger(
            connect_factory(self.ledger_conn_id),
            {name: connect_factory(conn_id) for name, conn_id in self.targets.items()},
            protocol=self.protocol,
            schema=self.ledger_schema,
            conn_ids=self.targets,
            wait_timeout=self._worker_wait(),
            max_result_bytes=self.max_result_bytes,
        )
        try:
            outcome = multi.run_outcome(
                key,
                fn,
                attempt=attempt,
                on_committed=self.on_committed,
                origin=origin,
                fingerprint=fingerprint,
                on_mismatch=self.on_mismatch,
            )
            if announce is not None:
                outcome = _announced(
                    outcome, multi.coordinator.announce(key, outcome.version, attempt, announce)
                )
            return outcome
        finally:
            multi.close()

    def run_effect(self, context: Any, fn: Callable[[Effect], Any]) -> Any:
        """Run ``fn`` as this task's effect. Its errors reach Airflow as they are: the retry
        policy (EosRetryPolicy) fails the permanent ones at once and retries the others."""
        ti = context["ti"]
        origin = Origin(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, code=code_of_run(ti))
        assets = asset_outlets(self.outlets)
        key = self.render_key(context)
        fingerprint = make_fingerprint(**self.fingerprint_inputs(context))
        announce = (
            {
                "dag_id": ti.dag_id,
                "task_id": ti.task_id,
                "run_id": ti.run_id,
                "map_index": ti.map_index,
                "partition_key": context.get("partition_key"),
                "assets": [a.uri for a in assets],
            }
            if assets
            else None
        )
        try:
            outcome = self.run_outcome(
                key,
                fn,
                attempt=ti.try_number,
                origin=origin,
                fingerprint=fingerprint,
                announce=announce,
            )
        except KeyInProgressError:
            if not self.deferrable:
                raise
            self._defer_until_free(key)
        self._eos_outcome = outcome  # the OpenLineage facet ``eos`` (operators/lineage.py)
        if assets:
            self._report_assets(context, assets, outcome)
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

    def _worker_wait(self) -> float:
        """How long the claim waits in the worker for another live run of the key."""
        return min(self.wait_timeout, DEFER_AFTER) if self.deferrable else self.wait_timeout

    def _defer_until_free(self, key: str) -> NoReturn:
        """Hand the wait to the triggerer: a LedgerTrigger fires when the key is committed or
        its last attempt failed, or after the wait bound; then :meth:`execute_after_wait`
        runs the task again (claim, skip or replace)."""
        from eos_airflow.triggers.ledger import LedgerTrigger

        conn_id = self.ledger_conn_id or self.conn_id
        assert conn_id is not None
        self.log.info(
            "exactly-once: effect %r is held by another live run: deferring until it is "
            "committed or released (the worker slot is free meanwhile)",
            key,
        )
        self.defer(
            trigger=LedgerTrigger(
                conn_id=conn_id,
                keys=[key],
                schema=self.ledger_schema,
                fail_on_failed=True,
                deadline=time.time() + max(self.wait_timeout, 60.0),
            ),
            method_name="execute_after_wait",
        )

    def execute_after_wait(self, context: Any, event: Any = None) -> Any:
        """Back from the triggerer: the key was committed, its holder failed, or the wait
        bound passed — run the task again (it claims, skips or defers once more)."""
        status = event.get("status") if isinstance(event, dict) else None
        if status == "error":
            raise AirflowFailException(f"exactly-once: waiting for the key failed: {event}")
        self.log.info("exactly-once: resumed after waiting (%s)", status)
        return self.execute(context)

    def _report_assets(self, context: Any, assets: list[Any], outcome: Outcome) -> None:
        """Airflow records this task's asset events when it succeeds: with ``extra["eos"]``
        when this run announced the version, none at all otherwise (the version was
        announced before, or a newer one exists)."""
        action = outcome.announced
        if action is None:
            self.outlets = []  # read by the task runner once execute returns
            self.log.info(
                "exactly-once: version %s of %r was reported before: no asset events",
                outcome.version,
                outcome.key,
            )
            return
        events = context["outlet_events"]
        for asset in assets:
            events[asset].extra["eos"] = {
                "key": outcome.key,
                "version": outcome.version,
                "action": action,
            }


def asset_outlets(outlets: Any) -> list[Any]:
    """The concrete assets among a task's outlets (asset events carry the eos extra)."""
    from airflow.sdk import Asset

    return [o for o in outlets or () if isinstance(o, Asset)]


def code_of_run(ti: Any) -> dict[str, Any]:
    """Which code runs this try: the DAG version and the DAG bundle's name and version."""
    bundle = getattr(ti, "bundle_instance", None)
    found = {
        "dag_version_id": getattr(ti, "dag_version_id", None),
        "bundle_name": getattr(bundle, "name", None),
        "bundle_version": getattr(bundle, "version", None),
    }
    return {k: str(v) for k, v in found.items() if v is not None}


def _announced(outcome: Outcome, action: str | None) -> Outcome:
    return dataclasses.replace(outcome, announced=action)


__all__ = [
    "DEFAULT_KEY",
    "PARTITION_KEY",
    "PROTOCOL_CHOICES",
    "ExactlyOnceBaseOperator",
    "SeveralTargets",
    "check_multi",
]
