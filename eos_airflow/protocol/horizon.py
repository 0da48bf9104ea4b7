"""Protocol tier: the safe horizon of an incremental copy: the largest value of the order column
below which no row can still appear.

A sequence hands out values when ``nextval`` runs, not when the row commits, and ``nextval``
is not transactional: a writer can hold value 4 while a later writer commits 5. A reader that
copied 5 and stored it as its position would never read 4. The default horizon, ``"wait"``
(see docs/guarantees.md, "The incremental horizon"), therefore:

1. **reads the sequence** behind the column: ``L``, the last value handed out by any session
   (with ``CACHE 1`` every value up to ``L`` has been drawn by then);
2. **lists the transactions holding the sequence**: ``nextval`` takes a lock on the sequence
   that its *top-level transaction* holds until it ends (prepared transactions keep it), so
   every transaction that drew a value ``<= L`` and has not ended yet is among the holders
   listed after step 1;
3. **waits until each of them has ended** (committed, rolled back, or for a prepared one:
   finished), at most ``horizon_timeout`` seconds, else :class:`HorizonTimeoutError`
   (retryable; nothing was copied);
4. **takes a snapshot** and reads up to ``L``: a transaction is visible to new snapshots
   before it releases its locks, so every row ``<= L`` that will ever commit is visible.

Not covered (stated in docs/guarantees.md): a value drawn in one transaction and inserted by
another (``SELECT nextval(...)`` in autocommit, then ``INSERT`` later), values written
without the sequence, sequences with ``CACHE > 1``, and standbys. For those, ``lag=`` keeps
the horizon a fixed distance below the newest value; the sequence checks refuse them unless
``lag`` is given. ``"none"`` reads everything visible (one writer inserting in commit
order). ``"xmin"`` is a deprecated alias of ``"wait"``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from eos_airflow.errors import ConfigurationError, HorizonTimeoutError
from eos_airflow.protocol.transfer import table_identifier

log = logging.getLogger(__name__)

#: The horizons a run accepts: wait for every writer that drew a value (default), or none.
HORIZONS = ("wait", "none")
#: Old names still accepted, with a DeprecationWarning, mapped to the safe behaviour.
DEPRECATED_HORIZONS = {"xmin": "wait"}

#: Seconds a run waits for the writers that drew values before it read the sequence. Writer
#: transactions are normally short; two minutes rides out a slow batch insert without letting
#: a transaction left open by an application hold the task for good (it fails, retryable).
DEFAULT_HORIZON_TIMEOUT = 120.0
#: Polling interval bounds (seconds) while waiting: fast for short writers, then backing off.
_POLL_FIRST, _POLL_MAX = 0.005, 0.25


def normalize_horizon(horizon: str) -> str:
    """``horizon`` as one of :data:`HORIZONS`; ``"xmin"`` warns and becomes ``"wait"``."""
    if horizon in DEPRECATED_HORIZONS:
        new = DEPRECATED_HORIZONS[horizon]
        message = (
            f"horizon={horizon!r} is deprecated and now means horizon={new!r} (it waits "
            "for writers that drew sequence values before the run read the sequence); "
            f"write horizon={new!r}"
        )
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        log.warning("%s", message)
        return new
    if horizon not in HORIZONS:
        raise ConfigurationError(
            f"horizon={horizon!r} is not valid; choose one of "
            f"{', '.join(map(repr, HORIZONS))} ('xmin' is a deprecated "
            "alias of 'wait')"
        )
    return horizon


@dataclass(frozen=True)
class OrderSequence:
    """The sequence that fills the order column, as found in the catalog."""

    oid: int
    name: str
    cache: int
    increment: int
    cycle: bool


#: The sequence behind ``column``: owned by it (serial, identity) or named by its default.
_SEQUENCE = """
    WITH col AS (
        SELECT a.attrelid, a.attnum FROM pg_attribute AS a
        WHERE a.attrelid = %(table)s::text::regclass AND a.attname = %(column)s::text
          AND NOT a.attisdropped)
    SELECT s.seqrelid::int, s.seqrelid::regclass::text, s.seqcache, s.seqincrement, s.seqcycle
    FROM pg_sequence AS s
    WHERE s.seqrelid = coalesce(
        pg_get_serial_sequence(%(table)s::text, %(column)s::text)::regclass,
        (SELECT d.refobjid FROM col
         JOIN pg_attrdef AS ad ON ad.adrelid = col.attrelid AND ad.adnum = col.attnum
         JOIN pg_depend AS d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
             AND d.refclassid = 'pg_class'::regclass
         JOIN pg_class AS c ON c.oid = d.refobjid AND c.relkind = 'S'
         ORDER BY d.refobjid LIMIT 1))
"""

#: Transactions of this database holding the sequence (``nextval`` keeps its lock until the
#: top-level transaction ends), other than this session: still running ones listed at the
#: start (``virtualtransaction``), and prepared ones (no backend; ``pid`` is NULL).
_HOLDERS = """
    SELECT DISTINCT l.virtualtransaction, l.pid, a.state, a.xact_start, a.application_name
    FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
    WHERE l.locktype = 'relation' AND l.relation = %(seq)s::oid
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.pid IS DISTINCT FROM pg_backend_pid()
      AND (%(listed)s::text[] IS NULL OR l.virtualtransaction = ANY(%(listed)s::text[])
           OR l.pid IS NULL)
    ORDER BY 1
"""


def order_sequence(conn: psycopg.Connection[Any], table: str, column: str) -> OrderSequence | None:
    """The sequence that fills ``table.column`` (``table`` as quoted SQL text), or None."""
    row = conn.execute(_SEQUENCE, {"table": table, "column": column}).fetchone()
    return OrderSequence(*row) if row else None


def refusal(
    conn: psycopg.Connection[Any], table: str, column: str, sequence: OrderSequence | None
) -> str | None:
    """Why ``"wait"`` cannot make ``table.column`` safe (None when it can); ``table`` as the
    user wrote it, for the message."""
    where = f"{table}.{column}"
    if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
        return (
            f"the source of {where} is a standby: the writers' locks live on the primary; "
            "read from the primary"
        )
    if sequence is None:
        return (
            f"{where} is not filled by a sequence (serial, identity or a nextval() "
            "default), so no writer can be waited for"
        )
    if sequence.cache > 1:
        return (
            f"sequence {sequence.name} behind {where} has CACHE {sequence.cache}: sessions "
            "hand out cached values out of order; run ALTER SEQUENCE "
            f"{sequence.name} CACHE 1"
        )
    if sequence.increment < 0 or sequence.cycle:
        return (
            f"sequence {sequence.name} behind {where} "
            f"{'descends' if sequence.increment < 0 else 'cycles'}: its values do not grow "
            "with time"
        )
    if not conn.execute(
        "SELECT has_sequence_privilege(%s::oid, 'SELECT, USAGE')", [sequence.oid]
    ).fetchone()[0]:  # type: ignore[index]
        return (
            f"the source's role {conn.info.user!r} cannot read sequence {sequence.name} "
            f"behind {where}; run GRANT SELECT ON SEQUENCE {sequence.name} TO "
            f"{conn.info.user}"
        )
    return None


def wait_for_writers(
    conn: psycopg.Connection[Any],
    sequence: OrderSequence,
    *,
    timeout: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Steps 1-3: read the sequence's last value, then wait until every transaction that held
    the sequence at that moment has ended. Returns the value (None: nothing drawn yet).

    ``conn`` must be in autocommit mode (each statement its own transaction, so this session
    holds no lock on the sequence while it waits).
    """
    last = conn.execute(
        "SELECT pg_sequence_last_value(%s::oid::regclass)", [sequence.oid]
    ).fetchone()[0]  # type: ignore[index]
    held = conn.execute(_HOLDERS, {"seq": sequence.oid, "listed": None}).fetchall()
    listed = [row[0] for row in held]
    start = time.monotonic()
    delay = _POLL_FIRST
    while held:
        waited = time.monotonic() - start
        if waited >= timeout:
            raise HorizonTimeoutError(_timeout_message(what, sequence, last, held, timeout))
        sleep(min(delay, timeout - waited))
        delay = min(delay * 2, _POLL_MAX)
        held = conn.execute(_HOLDERS, {"seq": sequence.oid, "listed": listed}).fetchall()
    waited = time.monotonic() - start
    if listed:
        log.info(
            "%s: waited %.3f s for %d writer(s) of %s that drew values up to %s",
            what,
            waited,
            len(listed),
            sequence.name,
            last,
        )
    return last


def _timeout_message(
    what: str, sequence: OrderSequence, last: Any, held: list[tuple[Any, ...]], timeout: float
) -> str:
    shown = []
    for _vxid, pid, state, xact_start, application in held[:5]:
        if pid is None:
            shown.append("a prepared transaction (see pg_prepared_xacts)")
        else:
            since = f" since {xact_start:%Y-%m-%d %H:%M:%S%z}" if xact_start else ""
            app = f", application {application!r}" if application else ""
            shown.append(f"pid {pid} ({state or 'unknown state'}{since}{app})")
    more = f" and {len(held) - 5} more" if len(held) > 5 else ""
    return (
        f"{what}: {len(held)} transaction(s) that may hold values of {sequence.name} up to "
        f"{last} are still open after {timeout:g} s: {'; '.join(shown)}{more}. Nothing was "
        "copied and the position did not move; the task can be retried. End those "
        "transactions, raise horizon_timeout, or give lag= to copy below a fixed distance "
        "instead"
    )


def range_query(
    source: sql.Composable,
    column: sql.Identifier,
    *,
    after: Any,
    ceiling: Any,
    use_ceiling: bool,
    lag: Any,
) -> sql.Composed:
    """Step 4: (largest visible value past ``after``, safe horizon) in one snapshot. The
    horizon is the largest visible value ``<= ceiling`` (when ``use_ceiling``) and, with
    ``lag``, at least ``lag`` below the largest visible value."""
    conditions: list[sql.Composable] = []
    if use_ceiling:
        conditions.append(
            sql.SQL("{col} <= {ceiling}").format(col=column, ceiling=sql.Literal(ceiling))
        )
    if lag is not None:
        distance = (
            sql.SQL("{}::interval").format(sql.Literal(lag))
            if isinstance(lag, str)
            else sql.Literal(lag)
        )
        conditions.append(
            sql.SQL("{col} <= (SELECT max({col}) FROM {src}) - {lag}").format(
                col=column, src=source, lag=distance
            )
        )
    safe = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
    return sql.SQL(
        "SELECT max({col}) AS visible, max({col}) FILTER (WHERE {safe}) AS safe "
        "FROM {src} WHERE {after}::text IS NULL OR {col} > {after}"
    ).format(col=column, src=source, safe=safe, after=sql.Literal(after))


def safe_horizon(
    connect: Callable[[], psycopg.Connection[Any]],
    source_table: str,
    column: str,
    *,
    horizon: str,
    lag: Any,
    after: Any,
    timeout: float = DEFAULT_HORIZON_TIMEOUT,
    what: str = "horizon",
) -> tuple[Any, Any]:
    """(largest visible value, safe horizon) of ``source_table.column`` past ``after``
    (``source_table``: ``"table"`` or ``"schema.table"``).

    ``horizon`` is normalised (:func:`normalize_horizon`). Raises :class:`ConfigurationError`
    when ``"wait"`` cannot make the column safe and no ``lag`` is given, and
    :class:`HorizonTimeoutError` when writers stay open longer than ``timeout`` seconds.
    """
    horizon = normalize_horizon(horizon)
    conn = connect()
    try:
        conn.autocommit = True
        source = table_identifier(source_table)
        table = source.as_string(conn)
        ceiling, use_ceiling = None, False
        if horizon == "wait":
            try:
                sequence = order_sequence(conn, table, column)
            except psycopg.Error as exc:
                raise ConfigurationError(
                    f"cannot read {source_table}.{column} in database {conn.info.dbname!r} "
                    f"({exc.sqlstate}: {exc.diag.message_primary}); check source_table and "
                    "column (nothing was written)"
                ) from exc
            reason = refusal(conn, source_table, column, sequence)
            if reason is None and sequence is not None:
                ceiling = wait_for_writers(conn, sequence, timeout=timeout, what=what)
                use_ceiling = True
            elif lag is None:
                raise ConfigurationError(
                    f"horizon='wait' cannot make the copy safe: {reason}. Give lag= (a "
                    "distance below the newest value that late writers stay within), or "
                    "horizon='none' if a single writer inserts in commit order (nothing was "
                    "written)"
                )
            else:
                log.info(
                    "%s: %s; the horizon keeps lag=%r below the newest value", what, reason, lag
                )
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                row = conn.execute(
                    range_query(
                        source,
                        sql.Identifier(column),
                        after=after,
                        ceiling=ceiling,
                        use_ceiling=use_ceiling,
                        lag=lag,
                    )
                ).fetchone()
            except psycopg.Error as exc:
                raise ConfigurationError(
                    f"cannot read {source_table}.{column} in database {conn.info.dbname!r} "
                    f"({exc.sqlstate}: {exc.diag.message_primary}); check source_table, "
                    "column and lag (nothing was written)"
                ) from exc
    finally:
        conn.close()
    return (row[0], row[1]) if row else (None, None)


__all__ = [
    "DEFAULT_HORIZON_TIMEOUT",
    "HORIZONS",
    "HorizonTimeoutError",
    "OrderSequence",
    "normalize_horizon",
    "order_sequence",
    "range_query",
    "refusal",
    "safe_horizon",
    "wait_for_writers",
]
