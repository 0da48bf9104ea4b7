"""Protocol tier: chunked effects: long loads committed chunk by chunk, with recovery points
(docs/guarantees.md, "Chunked effects").

One transaction per effect means a crash after 59 minutes of a 60-minute load loses 59
minutes. ``eos.checkpoints(source, every=N)`` splits the effect into chunks instead:

.. code-block:: python

    def load(eos):
        chunks = eos.checkpoints(read_rows, every=10_000, position=lambda row: row[0])
        for chunk in chunks:                       # a list of up to 10,000 source items
            with eos.conn.cursor().copy("COPY target FROM STDIN") as copy:
                for row in chunk:
                    copy.write_row(row)
        return {"rows": chunks.rows, "chunks": chunks.chunks}

Each chunk's writes and its **recovery point** (source items consumed so far, the last item's
``position`` if a ``position=`` function is given, and ``chunks.state``, any JSON the function
keeps) commit in one transaction through ``{schema}.checkpoint()``. That function is fenced
exactly like the final commit: an attempt whose key was claimed by a newer try cannot commit
another chunk (its chunk rolls back, ``FencedError``). The key stays ``running`` between
chunks; it becomes ``committed`` only with the last chunk, whose writes share the effect's
final transaction.

A retry (or another run of the same key) **resumes**: ``{schema}.resume()`` records the event
``resumed`` (where it continues) and the iteration starts after the newest recovery point of
the version being written. ``source`` is either

- an iterable: the items already committed are skipped (the iterable must yield the same
  items in the same order on every attempt, e.g. a query with ``ORDER BY`` a unique key), or
- a callable ``source(resume_from)`` returning an iterable of the items after ``resume_from``:
  the last committed ``position`` when a ``position=`` function is given (``None`` at the
  start), otherwise the number of items already committed (``0`` at the start). Use this to
  seek (``WHERE id > %s ORDER BY id``) instead of re-reading.

Visibility: chunks written straight into the target are visible as they commit (an append
load). To publish atomically, write the chunks into a staging table and move them into the
target after the loop, in the final transaction (see :func:`staging_table` and
:func:`publish_staged`): readers see no rows, then all of them.

Code before the loop runs again on every attempt and, on a resumed attempt, commits with the
``resumed`` event: keep it idempotent (``CREATE TABLE IF NOT EXISTS``, or check
``chunks.resumed``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from eos_airflow.errors import ConfigurationError
from eos_airflow.ledger.store import RecoveryPoint

if TYPE_CHECKING:
    from eos_airflow.protocol.effect import Effect

log = logging.getLogger(__name__)

#: Seconds between progress lines of a long copy or chunk loop in the task log.
PROGRESS_EVERY = 10.0

_END = object()


class Checkpoints:
    """Iterate a source in chunks; each chunk commits with its recovery point.

    Attributes after (and during) the loop: ``rows`` (items consumed, resumed ones included),
    ``chunks`` (chunks committed or pending), ``position`` (the last item's position),
    ``state`` (saved with each recovery point: assign JSON to it inside the loop), and
    ``resumed`` (the :class:`RecoveryPoint` this attempt continued after, or ``None``).
    """

    def __init__(
        self,
        eos: Effect,
        source: Iterable[Any] | Callable[[Any], Iterable[Any]],
        *,
        every: int | None = None,
        seconds: float | None = None,
        state: Any = None,
        position: Callable[[Any], Any] | None = None,
        total: int | None = None,
        label: str = "rows",
    ) -> None:
        if every is None and seconds is None:
            raise ConfigurationError(
                "checkpoints need every= (items per chunk) and/or seconds= (time per chunk), "
                "e.g. eos.checkpoints(rows, every=10_000)"
            )
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ConfigurationError(f"every= must be an integer >= 1, got {every!r}")
        if seconds is not None and not seconds > 0:
            raise ConfigurationError(f"seconds= must be > 0, got {seconds!r}")
        session = eos.session
        if session is None or not hasattr(session, "checkpoint"):
            raise ConfigurationError(
                "this effect cannot commit in chunks (its protocol has no recovery points); "
                "run it through Ledger.run or @task.exactly_once on one database"
            )
        self._eos = eos
        self._session = session
        self._source = source
        self.every = every
        self.seconds = seconds
        self._position_of = position
        self.total = total
        self.label = label
        self.resumed: RecoveryPoint | None = session.resume(eos)
        point = self.resumed
        self.rows = point.rows if point else 0
        self.chunks = point.seq if point else 0
        self.position = point.position if point else None
        self.state = point.state if point else state
        self._used = False
        if point:
            log.info(
                "effect %s: resuming after recovery point %s (%s %s consumed, position "
                "%s, committed by attempt %s)",
                eos.key,
                point.seq,
                f"{point.rows:,}",
                label,
                point.position,
                point.attempt,
            )

    def __repr__(self) -> str:
        return (
            f"<Checkpoints key={self._eos.key!r} chunks={self.chunks} rows={self.rows} "
            f"resumed={self.resumed is not None}>"
        )

    def _items(self) -> Iterator[Any]:
        if callable(self._source):
            start = self.position if self._position_of is not None else self.rows
            return iter(self._source(start))
        items = iter(self._source)
        for _ in range(self.rows):  # skip what the recovery point covers
            if next(items, _END) is _END:
                raise ConfigurationError(
                    f"effect {self._eos.key}: the source has fewer items than the "
                    f"{self.rows:,} already committed; it must yield the same items in the "
                    "same order on every attempt (e.g. ORDER BY a unique key)"
                )
        return items

    def __iter__(self) -> Iterator[list[Any]]:
        if self._used:
            raise ConfigurationError(
                "a Checkpoints object is iterated once; call "
                "eos.checkpoints(...) again for another loop"
            )
        self._used = True
        items = self._items()
        started, start_rows = time.monotonic(), self.rows
        last_log = started
        pending = next(items, _END)
        while pending is not _END:
            chunk = [pending]
            if self.seconds is None:
                chunk.extend(itertools.islice(items, self.every - 1))  # type: ignore[operator]
            else:
                chunk_started = time.monotonic()
                for item in items:
                    chunk.append(item)
                    if self.every is not None and len(chunk) >= self.every:
                        break
                    if time.monotonic() - chunk_started >= self.seconds:
                        break
            yield chunk
            self.rows += len(chunk)
            if self._position_of is not None:
                self.position = self._position_of(chunk[-1])
            self.chunks += 1
            pending = next(items, _END)
            final = pending is _END
            self._session.checkpoint(
                self._eos,
                rows=self.rows,
                position=self.position,
                state=self.state,
                detail={"chunk_rows": len(chunk)},
                final=final,
            )
            now = time.monotonic()
            if final or now - last_log >= PROGRESS_EVERY or self.chunks == 1:
                last_log = now
                log.info(
                    "effect %s: %s",
                    self._eos.key,
                    self._progress(now - started, self.rows - start_rows, final),
                )

    def _progress(self, elapsed: float, done: int, final: bool) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        text = (
            f"chunk {self.chunks} {'written (commits with the effect)' if final else 'committed'}"
            f": {self.rows:,} {self.label}"
        )
        if self.total:
            text += f" of {self.total:,} ({100 * self.rows / self.total:.0f}%)"
        text += f", {rate:,.0f} {self.label}/s"
        if self.total and rate > 0 and not final:
            text += f", ETA {max(0, self.total - self.rows) / rate:,.0f} s"
        return text


def staging_name(key: str, table: str) -> str:
    """A stable staging table name for ``key`` loading ``table`` (at most 63 bytes)."""
    digest = hashlib.sha256(f"{key}\x1f{table}".encode()).hexdigest()[:16]
    return f"eos_stage_{digest}"


def staging_table(
    conn: psycopg.Connection[Any], target: sql.Composable, name: str, *, schema: str | None = None
) -> sql.Composable:
    """Create (or recreate, empty) the staging table ``name`` shaped like ``target`` and
    return its identifier. Call it only when not resuming (``chunks.resumed is None``): on a
    resumed attempt the staging table holds the committed chunks."""
    ident = sql.Identifier(schema, name) if schema else sql.Identifier(name)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(ident, target))
    return ident


def publish_staged(
    conn: psycopg.Connection[Any],
    staging: sql.Composable,
    target: sql.Composable,
    *,
    delete_where: sql.Composable | None = None,
    params: Any = None,
) -> int:
    """In the final transaction: optionally delete ``delete_where`` from ``target``, move every
    staged row into it, drop the staging table; return the rows published."""
    if delete_where is not None:
        conn.execute(sql.SQL("DELETE FROM {} WHERE ").format(target) + delete_where, params)
    cur = conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(target, staging))
    conn.execute(sql.SQL("DROP TABLE {}").format(staging))
    return cur.rowcount


__all__ = ["Checkpoints", "RecoveryPoint", "publish_staged", "staging_name", "staging_table"]
