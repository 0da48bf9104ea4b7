"""API tier: programmatic use without Airflow: :class:`Ledger` (scripts, other orchestrators,
tests).

The Airflow decorator and operators are thin layers over :meth:`Ledger.run`.
"""

from __future__ import annotations

import json
import queue
import re
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import psycopg.conninfo

from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger import connection
from eos_airflow.ledger.keys import check_schema
from eos_airflow.ledger.store import LedgerStore
from eos_airflow.protocol.effect import MAX_RESULT_BYTES, Effect, Origin
from eos_airflow.protocol.local import DEFAULT_WAIT_TIMEOUT, Outcome, run_effect
from eos_airflow.states import check_attempt, check_on_committed, check_on_mismatch

Connect = Callable[[], "psycopg.Connection[Any]"]


#: PostgreSQL's longest identifier (NAMEDATALEN - 1); a longer name is silently truncated.
MAX_NAME_BYTES = 63
#: A quoted part of libpq's parse error: it quotes the offending text, which may be (part
#: of) a password (``invalid percent-encoded token: "s3cr%et"``).
_QUOTED = re.compile(r'"([^"]*)"')


def check_dsn(dsn: str) -> str:
    """Return ``dsn`` if libpq can parse it, else raise :class:`ConfigurationError` (whose
    message never quotes the DSN: it may hold a password)."""
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        reason = _QUOTED.sub(lambda m: m[0] if len(m[1]) < 2 else '"…"', str(exc).strip())
        raise ConfigurationError(
            f"not a PostgreSQL connection string ({reason}); use a URI such as "
            "postgresql://USER@HOST:5432/DBNAME or key=value pairs such as "
            "'host=HOST dbname=DBNAME user=USER'"
        ) from None
    return dsn


class Ledger:
    """An idempotency ledger in one PostgreSQL database.

    >>> ledger = Ledger("postgresql://localhost/warehouse")
    >>> def load(eos):
    ...     eos.conn.execute("INSERT INTO sales_daily SELECT ... WHERE day = %s", ["2024-01-01"])
    ...     return {"day": "2024-01-01"}
    >>> ledger.run("sales_daily/2024-01-01", load)   # a second call skips and returns the same

    Connections are kept in a small pool (one per concurrent caller) and reused.

    ``liveness_timeout`` (seconds; default ``EOS_LIVENESS_TIMEOUT`` or 60; 0 = off) bounds
    how long the server keeps the session of a caller whose network vanished — and with it
    the keys that caller owns: each connection opened from ``dsn`` sets the session's
    server-side TCP keepalives, ``tcp_user_timeout`` and ``client_connection_check_interval``
    from it (eos_airflow/ledger/connection.py). Connections from your own ``connect=``
    factory are used as they come (apply :func:`eos_airflow.ledger.connection.prepare`).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "eos",
        connect: Connect | None = None,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        max_result_bytes: int = MAX_RESULT_BYTES,
        max_idle: int = 32,
        liveness_timeout: float | None = None,
    ) -> None:
        if (dsn is None) == (connect is None):
            raise ConfigurationError("Ledger needs exactly one of dsn= or connect=")
        check_schema(schema)
        if dsn is not None:
            check_dsn(dsn)
        #: Seconds within which the server ends the session of a worker that went silent
        #: (its claims then free): see eos_airflow/ledger/connection.py; 0 = off.
        self.liveness_timeout = connection.liveness_timeout(liveness_timeout)
        self.dsn = dsn
        self.schema = schema
        self.wait_timeout = wait_timeout
        self.max_result_bytes = max_result_bytes
        self._connect = connect or self._connect_dsn
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue(max_idle)
        self._closed = False

    def __repr__(self) -> str:
        return f"<Ledger schema={self.schema!r} idle_connections={self._idle.qsize()}>"

    def _connect_dsn(self) -> psycopg.Connection[Any]:
        assert self.dsn is not None
        return connection.connect(
            self.dsn, application_name="eos-airflow", liveness_timeout=self.liveness_timeout
        )

    def connection(self) -> psycopg.Connection[Any]:
        """Take a connection from the pool (or open one); give it back with :meth:`putconn`."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        if not conn.autocommit:
            conn.autocommit = True
        return conn

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if self._closed or conn.closed or not idle:
            conn.close()
            return
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

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
        wait_timeout: float | None = None,
    ) -> Any:
        """Run ``fn(eos)`` as effect ``key`` exactly once and return its (stored) result.

        ``fingerprint``: a fingerprint of the inputs (e.g. from
        :func:`eos_airflow.fingerprint`), stored with the committed version; a later skip
        with another fingerprint is a mismatch, handled as ``on_mismatch`` says (``"warn"``,
        ``"fail"`` or ``"replace"``)."""
        return self.run_outcome(
            key,
            fn,
            attempt=attempt,
            on_committed=on_committed,
            origin=origin,
            wait_timeout=wait_timeout,
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
        wait_timeout: float | None = None,
    ) -> Outcome:
        """Like :meth:`run`, but say what happened (committed, replaced or skipped)."""
        on_committed = check_on_committed(on_committed)
        on_mismatch = check_on_mismatch(on_mismatch)
        attempt = check_attempt(attempt)
        conn = self.connection()
        try:
            return run_effect(
                conn,
                key,
                fn,
                schema=self.schema,
                attempt=attempt,
                on_committed=on_committed,
                origin=origin,
                fingerprint=fingerprint,
                on_mismatch=on_mismatch,
                max_result_bytes=self.max_result_bytes,
                wait_timeout=self.wait_timeout if wait_timeout is None else wait_timeout,
                reconnect=self._connect,
            )
        finally:
            self.putconn(conn)

    def announce(
        self, key: str, version: int, attempt: int, detail: Mapping[str, Any] | None = None
    ) -> str | None:
        """Record that ``version`` of ``key`` was reported to Airflow (as asset events):
        returns how it was made (``"committed"``, ``"replaced"``) when this call announced
        it; None when it was announced before or the key holds another version."""
        conn = self.connection()
        try:
            text = json.dumps(dict(detail), default=str) if detail else None
            return LedgerStore(conn, self.schema).announce(key, version, attempt, text)
        finally:
            self.putconn(conn)

    def migrate(self) -> list[str]:
        """Create or upgrade the ledger schema; return the revisions applied."""
        from eos_airflow.ledger.migrate import migrate  # Alembic only when migrating

        return migrate(self._connect, self.schema)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
