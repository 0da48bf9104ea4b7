"""Protocol tier: copy a query's rows into a table inside an effect, with COPY
(``ExactlyOnceTransferOperator``, ``IncrementalTableOperator``; usable without Airflow through
``Ledger.run``).

The source query streams out of the source database with ``COPY (query) TO STDOUT`` and into
the target table with ``COPY table FROM STDIN`` on the effect's connection, **inside the
effect's transaction**: the rows and the ledger's commit mark commit together. Binary COPY is
used when the query's column types equal the table's (the fastest path: no text parsing on
either side); otherwise text COPY, where PostgreSQL converts each value.

Modes:

- ``append``: insert the rows.
- ``replace``: ``DELETE FROM table WHERE replace_where`` (all rows if ``None``), then insert,
  in the same transaction: readers see the old partition until the new one commits.

``chunk_rows=N`` commits every ``N`` rows with a recovery point (protocol/checkpoints.py): a
retry continues after the last committed chunk instead of starting over. The source is read
again with ``OFFSET rows_done`` on a retry, so **the query must return the same rows in the
same order on every attempt**: ``ORDER BY`` a unique key over data that does not change while
the load runs (e.g. a closed partition). ``visibility`` says when rows become visible:
``"chunks"`` (append mode only: each chunk as it commits) or ``"atomic"`` (default for
``replace``: chunks go into a staging table in the target's schema, and the final
transaction deletes ``replace_where``, moves the staged rows in and drops the staging table —
readers never see a half-loaded partition).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql

from eos_airflow.errors import ConfigurationError
from eos_airflow.protocol.checkpoints import (
    PROGRESS_EVERY,
    publish_staged,
    staging_name,
    staging_table,
)
from eos_airflow.protocol.effect import Effect

log = logging.getLogger(__name__)

MODES = ("append", "replace")
VISIBILITIES = ("chunks", "atomic")

#: Rows copied between two looks at the clock for a progress line.
_BLOCK_ROWS = 65_536

#: Binary COPY framing (PostgreSQL docs, "Binary Format"): 11-byte signature, flags, header
#: extension length; the stream ends with a field count of -1.
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_TRAILER = b"\xff\xff"

Connect = Callable[[], "psycopg.Connection[Any]"]


def table_parts(name: str) -> tuple[str, ...]:
    """``"table"`` or ``"schema.table"`` split into its names (no dots inside names)."""
    parts = tuple(name.split(".")) if isinstance(name, str) else ()
    if not 1 <= len(parts) <= 2 or not all(p.strip() for p in parts):
        raise ConfigurationError(
            f"table {name!r} is not a table name; write 'table' or 'schema.table'"
        )
    return parts


def table_identifier(name: str) -> sql.Identifier:
    """``"table"`` or ``"schema.table"`` as a quoted identifier."""
    return sql.Identifier(*table_parts(name))


def inline(conn: psycopg.Connection[Any], query: str, params: Any) -> str:
    """``query`` with ``params`` bound client-side (COPY takes no server-side parameters)."""
    if not params:
        return query
    return psycopg.ClientCursor(conn).mogrify(query, params)


def target_columns(conn: psycopg.Connection[Any], table: sql.Identifier) -> list[tuple[str, int]]:
    """(name, type oid) of the table's columns, in order; a clear error if it is missing."""
    try:
        with conn.transaction():
            rows = conn.execute(
                "SELECT a.attname, a.atttypid FROM pg_attribute a "
                "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped "
                "ORDER BY a.attnum",
                [table.as_string(conn)],
            ).fetchall()
    except psycopg.errors.UndefinedTable:
        raise ConfigurationError(
            f"target table {'.'.join(table._obj)} does not exist in database "  # noqa: SLF001
            f"{conn.info.dbname!r}; create it before the transfer runs (nothing was written)"
        ) from None
    return [(name, oid) for name, oid in rows]


def describe(conn: psycopg.Connection[Any], query: str) -> list[int]:
    """Type oids of ``query``'s columns, without running it; a clear error if it is bad."""
    try:
        with conn.transaction():
            cur = conn.execute(
                sql.SQL("SELECT * FROM ({}) AS eos_source LIMIT 0").format(sql.SQL(query))
            )
    except psycopg.Error as exc:
        raise ConfigurationError(
            f"the source query failed in database {conn.info.dbname!r} "
            f"({exc.sqlstate}: {exc.diag.message_primary}); fix sql= (nothing was written)"
        ) from exc
    return [column.type_code for column in cur.description or ()]


class Stream:
    """One source COPY TO STDOUT, split into rows (the server sends one message per row)."""

    def __init__(self, conn: psycopg.Connection[Any], query: str, binary: bool) -> None:
        self.conn = conn
        self.query = query
        self.binary = binary
        self.header = b""

    def rows(self, skip: int = 0) -> Iterator[bytes]:
        query: sql.Composable = sql.SQL(self.query)
        if skip:
            query = sql.SQL("SELECT * FROM ({}) AS eos_source OFFSET {}").format(
                query, sql.Literal(skip)
            )
        fmt = sql.SQL("(FORMAT BINARY)" if self.binary else "(FORMAT TEXT)")
        statement = sql.SQL("COPY ({}) TO STDOUT {}").format(query, fmt)
        with self.conn.cursor().copy(statement) as copy:
            rows = iter(copy)
            if self.binary:
                first = next(rows, None)
                if first is None:
                    return
                size = len(_SIGNATURE) + 8 + int.from_bytes(first[15:19], "big")
                self.header, first = bytes(first[:size]), first[size:]
                if first and first != _TRAILER:
                    yield bytes(first)
                # C-level iteration: the end-of-data marker is the only 2-byte message
                yield from filter(_TRAILER.__ne__, map(bytes, rows))
            else:
                yield from map(bytes, rows)


def transfer(
    eos: Effect,
    source: Connect,
    *,
    query: str,
    table: str,
    mode: str = "append",
    replace_where: str | None = None,
    parameters: Mapping[str, Any] | Sequence[Any] | None = None,
    chunk_rows: int | None = None,
    visibility: str | None = None,
    columns: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Copy ``query``'s rows (source database) into ``table`` (the effect's database) as part
    of the effect ``eos``; return ``{"rows", "table", "mode", "format", "chunks"}``.
    ``columns`` names the target columns filled (default: all, in the table's order)."""
    visibility = check_options(mode, chunk_rows, visibility)
    target = table_identifier(table)
    conn = eos.conn
    all_columns = target_columns(conn, target)
    if columns:
        known = dict(all_columns)
        missing = [name for name in columns if name not in known]
        if missing:
            raise ConfigurationError(
                f"table {table} has no column {', '.join(map(repr, missing))}; its columns "
                f"are {', '.join(known)} (nothing was written)"
            )
        all_columns = [(name, known[name]) for name in columns]
    typed = all_columns
    src = source()
    try:
        src.autocommit = True
        text = inline(src, query, parameters)
        types = describe(src, text)
        if len(types) != len(typed):
            raise ConfigurationError(
                f"the source query returns {len(types)} columns and table {table} has "
                f"{len(typed)}; select one value per target column, in the table's order "
                "(nothing was written)"
            )
        binary = types == [oid for _, oid in typed]
        fmt = sql.SQL("(FORMAT BINARY)" if binary else "(FORMAT TEXT)")
        where = sql.SQL(replace_where) if replace_where else sql.SQL("true")
        where_params = parameters if replace_where else None
        if chunk_rows is None:
            if mode == "replace":
                conn.execute(sql.SQL("DELETE FROM {} WHERE ").format(target) + where, where_params)
            rows = _copy_all(eos, src, text, target, typed, fmt, binary)
            chunks = 1
        else:
            rows, chunks = _copy_chunks(
                eos,
                src,
                text,
                target,
                typed,
                binary,
                chunk_rows,
                visibility,
                where if mode == "replace" else None,
                where_params,
                table,
            )
    finally:
        src.close()
    return {
        "rows": rows,
        "table": table,
        "mode": mode,
        "chunks": chunks,
        "format": "binary" if binary else "text",
    }


def check_options(mode: str, chunk_rows: int | None, visibility: str | None) -> str:
    if mode not in MODES:
        raise ConfigurationError(
            f"mode={mode!r} is not valid; choose one of {', '.join(map(repr, MODES))}"
        )
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ConfigurationError(f"chunk_rows must be an integer >= 1 or None, got {chunk_rows!r}")
    if visibility is None:
        visibility = "atomic" if mode == "replace" else "chunks"
    if visibility not in VISIBILITIES:
        raise ConfigurationError(
            f"visibility={visibility!r} is not valid; choose one of "
            f"{', '.join(map(repr, VISIBILITIES))}"
        )
    if mode == "replace" and visibility == "chunks":
        raise ConfigurationError(
            "mode='replace' with visibility='chunks' would show a half-replaced partition; "
            "use visibility='atomic' (the default for replace)"
        )
    return visibility


def _copy_into(
    target: sql.Composable, columns: list[tuple[str, int]], fmt: sql.Composable
) -> sql.Composed:
    names = sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns)
    return sql.SQL("COPY {} ({}) FROM STDIN {}").format(target, names, fmt)


def _copy_all(
    eos: Effect,
    src: psycopg.Connection[Any],
    query: str,
    target: sql.Composable,
    columns: list[tuple[str, int]],
    fmt: sql.Composable,
    binary: bool,
) -> int:
    """One COPY from the source straight into the target, in the effect's transaction."""
    started = last = time.monotonic()
    out_sql = sql.SQL("COPY ({}) TO STDOUT {}").format(sql.SQL(query), fmt)
    tgt = eos.conn.cursor()
    with src.cursor().copy(out_sql) as out, tgt.copy(_copy_into(target, columns, fmt)) as inp:
        messages, source = 0, iter(out)  # one message per row
        while True:
            # a block of rows copied by a loop in C (map), not one Python step per row
            block = len(list(map(inp.write, itertools.islice(source, _BLOCK_ROWS))))
            messages += block
            if block < _BLOCK_ROWS:
                break
            if (now := time.monotonic()) - last >= PROGRESS_EVERY:
                last = now
                log.info(
                    "effect %s: copied %s rows (%s rows/s)",
                    eos.key,
                    f"{messages:,}",
                    f"{messages / (now - started):,.0f}",
                )
    rows = tgt.rowcount
    elapsed = time.monotonic() - started
    log.info(
        "effect %s: copied %s rows in %.1f s (%s rows/s, %s COPY)",
        eos.key,
        f"{rows:,}",
        elapsed,
        f"{rows / elapsed:,.0f}" if elapsed > 0 else "-",
        "binary" if binary else "text",
    )
    return rows


def _copy_chunks(
    eos: Effect,
    src: psycopg.Connection[Any],
    query: str,
    target: sql.Identifier,
    columns: list[tuple[str, int]],
    binary: bool,
    chunk_rows: int,
    visibility: str,
    delete_where: sql.Composable | None,
    parameters: Any,
    table: str,
) -> tuple[int, int]:
    stream = Stream(src, query, binary)
    chunks = eos.checkpoints(lambda done: stream.rows(skip=done), every=chunk_rows)
    dest: sql.Composable = target
    parts = table_parts(table)
    schema = parts[0] if len(parts) == 2 else None
    if visibility == "atomic":
        if chunks.resumed is not None and (chunks.resumed.state or {}).get("staging"):
            name = chunks.resumed.state["staging"]
        else:
            # a name of its own per fresh start: a zombie's uncommitted table cannot block it
            name = staging_name(f"{eos.key}/{uuid.uuid4()}", table)
            staging_table(eos.conn, target, name, schema=schema)
        chunks.state = {"staging": name}
        dest = sql.Identifier(schema, name) if schema else sql.Identifier(name)
    fmt = sql.SQL("(FORMAT BINARY)" if binary else "(FORMAT TEXT)")
    copy_in = _copy_into(dest, columns, fmt)
    for chunk in chunks:
        with eos.conn.cursor().copy(copy_in) as inp:
            if binary:
                inp.write(stream.header + b"".join(chunk) + _TRAILER)
            else:
                inp.write(b"".join(chunk))
    if visibility == "atomic":
        published = publish_staged(
            eos.conn, dest, target, delete_where=delete_where, params=parameters
        )
        log.info("effect %s: published %s staged rows into %s", eos.key, f"{published:,}", table)
    return chunks.rows, chunks.chunks


__all__ = [
    "check_options",
    "describe",
    "inline",
    "table_identifier",
    "table_parts",
    "target_columns",
    "transfer",
]
