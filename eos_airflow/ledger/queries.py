"""Ledger tier: loads the ledger's SQL (``sql/*.sql``) and renders the schema name as an identifier.

This module is the only reader of the SQL files: the protocol and the CLI ask it for a query
by name. Identifiers go through :mod:`psycopg.sql`; values are always bound parameters.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from eos_airflow.ledger.keys import check_schema

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _read(filename: str) -> str:
    return resources.files("eos_airflow.ledger").joinpath("sql", filename).read_text("utf-8")


#: NOTIFY channel names are identifiers: at most 63 bytes (NAMEDATALEN - 1).
_MAX_CHANNEL_BYTES = 63


def notify_channel(schema: str) -> str:
    """The channel on which the ledger's commit function notifies waiters of ``schema``:
    ``eos_committed_<schema>``, or a hash of the schema name when that would be too long."""
    channel = f"eos_committed_{schema}"
    if len(channel.encode("utf-8")) > _MAX_CHANNEL_BYTES:
        channel = f"eos_committed_{hashlib.sha256(schema.encode('utf-8')).hexdigest()[:32]}"
    return channel


def prepared_names(schema: str) -> tuple[str, str]:
    """The session-level prepared statements of the hot path for ``schema``: claim, commit."""
    digest = hashlib.sha256(schema.encode("utf-8")).hexdigest()[:16]
    return f"eos_claim_{digest}", f"eos_commit_{digest}"


def _placeholders(schema: str) -> dict[str, sql.Composable]:
    """``{schema}`` (identifier), ``{channel}`` (identifier, for LISTEN),
    ``{channel_literal}`` (string literal, for pg_notify) and the hot path's prepared
    statement names ``{claim_statement}``, ``{commit_statement}`` (identifiers)."""
    check_schema(schema)
    channel = notify_channel(schema)
    claim_statement, commit_statement = prepared_names(schema)
    return {
        "schema": sql.Identifier(schema),
        "channel": sql.Identifier(channel),
        "channel_literal": sql.Literal(channel),
        "claim_statement": sql.Identifier(claim_statement),
        "commit_statement": sql.Identifier(commit_statement),
    }


def render(text: str, schema: str) -> sql.Composed:
    """Render ``{schema}`` in ``text`` as the quoted identifier ``schema`` (and the notify
    channel placeholders, see :func:`_placeholders`)."""
    return sql.SQL(text).format(**_placeholders(schema))


#: Files of named query blocks: the protocol's hot path, and the audit tools' reads.
QUERY_FILES = ("queries.sql", "audit.sql", "checkpoints.sql", "twophase.sql", "outbox.sql")


@functools.cache
def _blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for filename in QUERY_FILES:
        parts = _NAME.split(_read(filename))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in blocks:
                raise RuntimeError(f"query {name!r} is defined twice ({filename})")
            blocks[name] = body.strip()
    return blocks


@functools.cache
def query(name: str, schema: str) -> bytes:
    """The named query for ``schema``, rendered once and cached as bytes for the hot path.

    Always execute it with parameters (``{}`` if none): a ``%`` in the schema name is
    doubled so that psycopg does not read it as a placeholder.
    """
    doubled = {
        placeholder: sql.SQL(part.as_string(None).replace("%", "%%"))
        for placeholder, part in _placeholders(schema).items()
    }
    return sql.SQL(_blocks()[name]).format(**doubled).as_bytes(None)


def execute_script(conn: psycopg.Connection[Any], filename: str, schema: str) -> None:
    """Run a whole ``sql/`` script (e.g. a migration's functions) in ``conn``'s transaction."""
    conn.execute(render(_read(filename), schema))
