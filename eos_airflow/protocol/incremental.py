"""Protocol tier: incremental copy: a table's new rows exactly once, by a monotonic column.

The engine of ``IncrementalTableOperator`` (eos_airflow/operators/incremental.py).

Each run reads the source rows whose ``column`` is past the position committed by the last
run (``eos.offsets``, source ``table:<source_conn_id>/<source_table>``), writes them into the
target table and advances the position **in the same transaction** as the rows and the ledger
mark. A crash anywhere leaves either nothing (the retry reads the same rows again) or rows and
position together (the retry skips): no gap, no duplicate.

**Late commits.** A sequence (``serial``, identity) hands out values when ``nextval`` runs,
not when the row commits: a writer can hold id 101 (drawn by a default, a BEFORE trigger or an
ORM that fetches ids first) while another commits id 102. A reader that stored "102" as its
position would never read 101. So a run reads only up to a **safe horizon**, ``horizon=``
(:mod:`eos_airflow.protocol.horizon`, argued in docs/guarantees.md):

- ``"wait"`` (default): read the last value of the column's sequence, wait until every
  transaction that held the sequence at that moment has ended (at most ``horizon_timeout``
  seconds, else a retryable :class:`~eos_airflow.errors.HorizonTimeoutError`), then copy up to
  that value from a new snapshot. Refused (``ConfigurationError``) for columns without a
  ``CACHE 1`` ascending sequence and for standbys, unless ``lag`` is given. ``"xmin"`` is a
  deprecated alias.
- ``"none"``: read up to the largest visible value. Correct only when a single writer inserts
  in commit order.

``lag=`` additionally keeps the horizon at least ``lag`` below the largest visible value
(a number for numeric columns, or an interval string such as ``"5 minutes"`` for timestamp
columns): an allowance for what the wait cannot see (a value drawn in one transaction and
inserted by a later one, timestamps, another database).

``chunk_rows=N`` commits every N rows with a recovery point (and advances the position with
each chunk); the column must then be unique (a key), so that a chunk boundary falls between
two values. Concurrent runs of one source serialise: the position is read under a lock held
until the run commits (with ``chunk_rows``, a session lock held for the whole run).
"""

from __future__ import annotations

import datetime as dt
import decimal
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger.store import LedgerStore
from eos_airflow.protocol.effect import Effect
from eos_airflow.protocol.horizon import (
    DEFAULT_HORIZON_TIMEOUT,
    normalize_horizon,
    safe_horizon,
)
from eos_airflow.protocol.transfer import (
    Connect,
    Stream,
    table_identifier,
    target_columns,
    transfer,
)

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    """A column value as a JSON position (and back as a SQL literal through psycopg)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def incremental(
    eos: Effect,
    source: Connect,
    *,
    source_table: str,
    column: str,
    target_table: str,
    columns: Sequence[str] | None = None,
    offset_source: str,
    horizon: str = "wait",
    lag: Any = None,
    chunk_rows: int | None = None,
    horizon_timeout: float = DEFAULT_HORIZON_TIMEOUT,
) -> dict[str, Any]:
    """Copy the rows of ``source_table`` past the committed position of ``column`` into
    ``target_table``, advancing the position in the effect's transaction."""
    horizon = normalize_horizon(horizon)
    src_ident = table_identifier(source_table)
    target = table_identifier(target_table)
    names = list(columns) if columns else [name for name, _ in target_columns(eos.conn, target)]
    if chunk_rows is not None:
        if column not in names:
            raise ConfigurationError(
                f"with chunk_rows, the copied columns must include {column!r} (the position)"
            )
        # one run of this source at a time for the whole chunked run (ends with the session)
        LedgerStore(eos.conn, eos.schema).lock_offset(offset_source)
    try:
        chunks = None
        seek: Any = None  # a resumed run continues after this committed position
        if chunk_rows is not None:
            stream: list[Stream] = []
            chunks = eos.checkpoints(
                lambda done: stream[0].rows(skip=0 if seek is not None else done), every=chunk_rows
            )
        if chunks is not None and chunks.resumed is not None and chunks.resumed.state:
            # the range this run fixed before its first chunk; the position moved since
            after, to = chunks.resumed.state["from"], chunks.resumed.state["to"]
            visible = chunks.resumed.state.get("visible")
            # Continue after the committed position rather than after the rows this run
            # consumed: while this run was failed it held no lock on the source, and another
            # run may have copied past its last chunk (those rows must not be copied again).
            seek = eos.offsets.get(offset_source)
        else:
            after = eos.offsets.get(offset_source)
            visible, to = _horizon(
                source,
                source_table,
                column,
                horizon,
                lag,
                after,
                horizon_timeout,
                f"effect {eos.key}",
            )
        result: dict[str, Any] = {
            "source": offset_source,
            "from": after,
            "to": to,
            "rows": 0,
            "visible": visible,
        }
        if to is None:
            log.info(
                "effect %s: no rows of %s past %r below the safe horizon (largest visible %r)",
                eos.key,
                source_table,
                after,
                visible,
            )
            result["to"] = after
            return result
        select = sql.SQL(
            "SELECT {cols} FROM {src} WHERE ({after}::text IS NULL OR {col} > {after}) "
            "AND {col} <= {to} ORDER BY {col}"
        ).format(
            cols=sql.SQL(", ").join(map(sql.Identifier, names)),
            src=src_ident,
            col=sql.Identifier(column),
            after=sql.Literal(after if seek is None else seek),
            to=sql.Literal(to),
        )
        conn = source()
        try:
            conn.autocommit = True
            query = select.as_string(conn)
            if chunks is None:
                copied = transfer(eos, source, query=query, table=target_table, columns=names)
                result.update(rows=copied["rows"], format=copied["format"])
            else:
                stream.append(Stream(conn, query, binary=False))
                chunks.state = {"from": after, "to": to, "visible": visible}
                result.update(
                    _chunked(eos, chunks, target, names, names.index(column), offset_source)
                )
        finally:
            conn.close()
        if seek is None or not _beyond(seek, to):  # never move the position back
            eos.offsets[offset_source] = to
        log.info(
            "effect %s: %s rows of %s, %s %r -> %r",
            eos.key,
            result["rows"],
            source_table,
            column,
            after,
            to,
        )
        return result
    finally:
        if chunk_rows is not None:
            _unlock(eos, offset_source)


def _beyond(a: Any, b: Any) -> bool:
    """Is position ``a`` past position ``b``? Positions are JSON: numbers, or the text of
    numbers, timestamps and other values (see :func:`_jsonable`)."""
    for convert in (decimal.Decimal, dt.datetime.fromisoformat):
        try:
            return bool(convert(a) > convert(b))  # type: ignore[operator]
        except (ValueError, TypeError, decimal.InvalidOperation):
            continue
    return str(a) > str(b)


def _unlock(eos: Effect, offset_source: str) -> None:
    """Drop the run's session lock on the source, also when the run failed (an aborted
    transaction is rolled back first: the effect fails anyway). Never hides the error."""
    conn = eos.conn
    if conn.closed:
        return
    try:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            conn.execute("ROLLBACK")
        LedgerStore(conn, eos.schema).unlock_offset(offset_source)
    except psycopg.Error:
        log.warning(
            "could not unlock source %s; closing the connection frees it",
            offset_source,
            exc_info=True,
        )
        conn.close()


def _horizon(
    source: Connect,
    source_table: str,
    column: str,
    horizon: str,
    lag: Any,
    after: Any,
    timeout: float,
    what: str,
) -> tuple[Any, Any]:
    """(largest visible value, safe horizon) past ``after`` (see :mod:`..protocol.horizon`)."""
    visible, safe = safe_horizon(
        source,
        source_table,
        column,
        horizon=horizon,
        lag=lag,
        after=after,
        timeout=timeout,
        what=what,
    )
    return _jsonable(visible), _jsonable(safe)


def _chunked(
    eos: Effect,
    chunks: Any,
    target: sql.Identifier,
    names: list[str],
    index: int,
    offset_source: str,
) -> dict[str, Any]:
    """Chunked copy ordered by the (unique) column: each chunk advances the position."""
    copy_in = sql.SQL("COPY {} ({}) FROM STDIN").format(
        target, sql.SQL(", ").join(map(sql.Identifier, names))
    )
    for chunk in chunks:
        with eos.conn.cursor().copy(copy_in) as copy:
            copy.write(b"".join(chunk))
        last = bytes(chunk[-1]).rstrip(b"\n").split(b"\t")[index].decode()
        eos.offsets[offset_source] = int(last) if last.lstrip("-").isdigit() else last
    return {
        "rows": chunks.rows - (chunks.resumed.rows if chunks.resumed else 0),
        "rows_total": chunks.rows,
        "chunks": chunks.chunks,
        "format": "text",
        "resumed_after": chunks.resumed.rows if chunks.resumed else None,
    }
