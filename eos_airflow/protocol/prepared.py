"""Protocol tier: global transaction ids and PostgreSQL's prepared transactions.

A global transaction (txid) of the two- and three-phase protocols is prepared on each
participant under the gid ``<txid>:<participant>``; recovery recognises our gids by their
prefix and parses them back (:func:`parse_gid`).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

#: Every global transaction id starts with this, so recovery recognises its own.
GID_PREFIX = "eos:"
#: PostgreSQL limits a prepared transaction's gid to 200 bytes (GIDSIZE).
MAX_GID_BYTES = 200
_GID = re.compile(r"^eos:([23]):([0-9a-f]{16}):(\d+):([0-9a-f]{8}):([A-Za-z0-9_]{1,40})$")


@dataclass(frozen=True)
class Gid:
    """A parsed global transaction id: ``eos:<2|3>:<key hash>:<attempt>:<token>:<name>``."""

    txid: str
    participant: str
    protocol: str
    key_hash: str
    attempt: int


def key_hash(key: str) -> str:
    """16 hex digits of SHA-256 of the key: keys may be 1,000 characters, gids only 200 bytes."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def make_txid(protocol: str, key: str, attempt: int, owner: uuid.UUID) -> str:
    return f"{GID_PREFIX}{protocol[0]}:{key_hash(key)}:{attempt}:{owner.hex[:8]}"


def gid_of(txid: str, participant: str) -> str:
    return f"{txid}:{participant}"


def parse_gid(gid: str) -> Gid | None:
    """The parts of one of our gids, or None for someone else's prepared transaction."""
    match = _GID.match(gid)
    if match is None:
        return None
    protocol, hashed, attempt, _, name = match.groups()
    return Gid(gid.rsplit(":", 1)[0], name, f"{protocol}pc", hashed, int(attempt))


def statement(verb: str, gid: str) -> sql.Composed:
    return sql.SQL(verb + " {}").format(sql.Literal(gid))


def rollback_open(conn: psycopg.Connection[Any]) -> None:
    """Roll back an open (not prepared) transaction; close the connection if that fails."""
    if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()


def finish_prepared(conn: psycopg.Connection[Any], gid: str, *, commit: bool) -> bool:
    """COMMIT or ROLLBACK PREPARED ``gid``; False when it is not (or no longer) prepared."""
    try:
        conn.execute(statement("COMMIT PREPARED" if commit else "ROLLBACK PREPARED", gid))
    except pgerrors.UndefinedObject:  # finished already (by another recovery or the attempt)
        return False
    return True


def prepared_on(conn: psycopg.Connection[Any], prefix: str = GID_PREFIX) -> dict[str, datetime]:
    """This database's prepared transactions whose gid starts with ``prefix``."""
    rows = conn.execute(
        "SELECT gid, prepared FROM pg_prepared_xacts "
        "WHERE database = current_database() AND starts_with(gid, %s)",
        [prefix],
    ).fetchall()
    return {gid: prepared for gid, prepared in rows}


__all__ = [
    "GID_PREFIX",
    "MAX_GID_BYTES",
    "Gid",
    "finish_prepared",
    "gid_of",
    "key_hash",
    "make_txid",
    "parse_gid",
    "prepared_on",
    "rollback_open",
    "statement",
]
