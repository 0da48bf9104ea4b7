"""API tier: programmatic use of effects across several databases, without Airflow:
:class:`MultiLedger`.

The Airflow decorator (``targets=``) and ``MultiTargetSQLOperator`` are thin layers over
:meth:`MultiLedger.run_outcome`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from eos_airflow.api import Ledger
from eos_airflow.errors import ConfigurationError
from eos_airflow.protocol.effect import MAX_RESULT_BYTES, Effect, Origin
from eos_airflow.protocol.local import DEFAULT_WAIT_TIMEOUT, Outcome
from eos_airflow.protocol.recovery import DEFAULT_GRACE, Resolution, recover, terminate
from eos_airflow.protocol.twophase import check_targets, run_two_phase
from eos_airflow.states import check_attempt, check_on_committed, check_on_mismatch

Connect = Callable[[], "psycopg.Connection[Any]"]
Target = str | Connect


class MultiLedger:
    """Exactly-once effects written to several databases in one atomic commit.

    >>> banks = MultiLedger("postgresql:///bank_a", {"a": "postgresql:///bank_a",
    ...                                              "b": "postgresql:///bank_b"})
    >>> def transfer(eos):
    ...     eos.conns["a"].execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    ...     eos.conns["b"].execute("UPDATE accounts SET balance = balance + 10 WHERE id = 1")
    ...     return {"amount": 10}
    >>> banks.run("transfer/42", transfer)       # a second call skips and returns the same

    ``coordinator`` holds the decision log (its ledger claims the key); each participant is a
    DSN or a connection factory. ``conn_ids`` (participant name → Airflow connection id) are
    written to the decision log so that ``eos-airflow recover`` finds the participants again.
    """

    def __init__(
        self,
        coordinator: Target,
        participants: Mapping[str, Target],
        *,
        protocol: str = "2pc",
        schema: str = "eos",
        conn_ids: Mapping[str, str] | None = None,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        max_result_bytes: int = MAX_RESULT_BYTES,
    ) -> None:
        check_targets(participants, protocol)
        self.protocol = protocol
        self.schema = schema
        self.conn_ids = dict(conn_ids or {})
        self.wait_timeout = wait_timeout
        self.max_result_bytes = max_result_bytes
        self.coordinator = _ledger(coordinator, schema)
        self.participants = {name: _ledger(target, schema) for name, target in participants.items()}
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"<MultiLedger protocol={self.protocol} participants={sorted(self.participants)}>"

    def run(
        self,
        key: str,
        fn: Callable[[Effect], Any],
        *,
        attempt: int = 1,
        on_committed: str = "skip",
        origin: Origin | None = None,
        fingerprint: str | None = None,
        on_mismatch: str = "warn",
    ) -> Any:
        """Run ``fn(eos)`` as effect ``key`` exactly once on every participant."""
        return self.run_outcome(
            key,
            fn,
            attempt=attempt,
            on_committed=on_committed,
            origin=origin,
            fingerprint=fingerprint,
            on_mismatch=on_mismatch,
        ).result

    def run_outcome(
        self,
        key: str,
        fn: Callable[[Effect], Any],
        *,
        attempt: int = 1,
        on_committed: str = "skip",
        origin: Origin | None = None,
        fingerprint: str | None = None,
        on_mismatch: str = "warn",
    ) -> Outcome:
        """Like :meth:`run`, but say what happened (committed, replaced, skipped, recovered)."""
        on_committed = check_on_committed(on_committed)
        on_mismatch = check_on_mismatch(on_mismatch)
        attempt = check_attempt(attempt)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=len(self.participants), thread_name_prefix="eos-2pc"
            )
        coordinator = self.coordinator.connection()
        conns: dict[str, psycopg.Connection[Any]] = {}
        try:
            for name, ledger in self.participants.items():
                conns[name] = ledger.connection()
            return run_two_phase(
                coordinator,
                conns,
                key,
                fn,
                protocol=self.protocol,
                conn_ids=self.conn_ids,
                schema=self.schema,
                attempt=attempt,
                on_committed=on_committed,
                origin=origin,
                fingerprint=fingerprint,
                on_mismatch=on_mismatch,
                wait_timeout=self.wait_timeout,
                max_result_bytes=self.max_result_bytes,
                executor=self._executor,
            )
        finally:
            self.coordinator.putconn(coordinator)
            for name, conn in conns.items():
                self.participants[name].putconn(conn)

    def recover(self, *, grace: float = DEFAULT_GRACE) -> list[Resolution]:
        """Finish the coordinator's in-doubt transactions (see ``eos-airflow recover``)."""
        coordinator = self.coordinator.connection()
        try:
            return recover(
                coordinator,
                schema=self.schema,
                grace=grace,
                participants={n: ledger.connection for n, ledger in self.participants.items()},
            )
        finally:
            self.coordinator.putconn(coordinator)

    def terminate(self, *, grace: float = DEFAULT_GRACE) -> list[Resolution]:
        """The 3PC termination protocol on the participants alone (coordinator down)."""
        return terminate(
            {n: ledger.connection for n, ledger in self.participants.items()},
            schema=self.schema,
            grace=grace,
        )

    def migrate(self) -> None:
        """Create or upgrade the ledger schema in the coordinator and every participant."""
        for ledger in (self.coordinator, *self.participants.values()):
            ledger.migrate()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        for ledger in (self.coordinator, *self.participants.values()):
            ledger.close()

    def __enter__(self) -> MultiLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ledger(target: Target, schema: str) -> Ledger:
    if isinstance(target, str):
        return Ledger(target, schema=schema)
    if callable(target):
        return Ledger(connect=target, schema=schema)
    raise ConfigurationError(
        f"a database must be a DSN string or a connection factory, got {type(target).__name__}"
    )


__all__ = ["MultiLedger"]
