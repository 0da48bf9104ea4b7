"""Protocol tier: writing to the outbox inside an effect, and the relay's reads and marks.

:func:`publish` is what ``eos.publish(...)`` calls: it validates the message first (a bad
payload or destination raises :class:`~eos_airflow.protocol.messages.MessageError` before any
statement runs), then inserts one row on ``eos.conn``, inside the effect's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from eos_airflow.ledger.store import Backlog, LedgerStore
from eos_airflow.protocol.messages import (
    Destination,
    MessageError,
    OutboxMessage,
    check_headers,
    encode_payload,
    message_id,
    parse_destination,
)

if TYPE_CHECKING:
    from eos_airflow.protocol.effect import Effect


def publish(
    eos: Effect,
    destination: str,
    payload: Any,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Queue ``payload`` for ``destination`` in ``eos``'s transaction; return the message id."""
    parse_destination(destination)
    body = encode_payload(payload, destination)
    if key is not None and not isinstance(key, str):
        raise MessageError(
            f"message to {destination!r}: key must be a string or None, got {type(key).__name__}"
        )
    header_json = json.dumps(check_headers(headers, destination))
    version = eos.previous.version + 1 if eos.previous is not None else 1
    store = LedgerStore(eos.conn, eos.schema)
    seq = eos.next_message_seq(lambda: store.outbox_last_seq(eos.key, version))
    mid = message_id(eos.conn.info.dbname, eos.schema, eos.key, version, seq)
    store.outbox_insert(
        {
            "key": eos.key,
            "owner": getattr(eos.session, "owner", None),
            "version": version,
            "seq": seq,
            "message_id": mid,
            "destination": destination,
            "message_key": key,
            "payload": body,
            "headers": header_json,
        }
    )
    return str(mid)


def split_destinations(destinations: Sequence[str]) -> tuple[list[str], list[str]]:
    """``["nats:*", "kafka:alerts"]`` → (exact destinations, whole schemes); checks each."""
    exact: list[str] = []
    schemes: list[str] = []
    for item in destinations:
        if isinstance(item, str) and item.endswith(":*"):
            scheme = item[:-2]
            parse_destination(f"{scheme}:x")  # known scheme?
            schemes.append(scheme)
        else:
            exact.append(str(parse_destination(item)))
    return exact, schemes


def pending(
    conn: psycopg.Connection[Any], schema: str, exact: list[str], schemes: list[str], limit: int
) -> list[OutboxMessage]:
    """Lock and return the oldest undelivered messages (inside the caller's transaction)."""
    return [
        OutboxMessage(
            r.id,
            r.message_id,
            Destination(*r.destination.split(":", 1)),
            r.message_key,
            r.payload,
            r.headers or {},
        )
        for r in LedgerStore(conn, schema).outbox_pending(exact, schemes, limit)
    ]


def mark_delivered(conn: psycopg.Connection[Any], schema: str, ids: list[int], relay: str) -> int:
    return LedgerStore(conn, schema).outbox_mark_delivered(ids, relay)


def backlog(conn: psycopg.Connection[Any], schema: str = "eos") -> list[Backlog]:
    """Undelivered messages per destination (destination, pending, oldest)."""
    return LedgerStore(conn, schema).outbox_backlog()


__all__ = ["backlog", "mark_delivered", "pending", "publish", "split_destinations"]
