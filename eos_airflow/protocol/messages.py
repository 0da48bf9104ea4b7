"""Protocol tier: outbox messages: destinations, deterministic message ids, and payload checks.

A destination is ``scheme:name``: ``nats:SUBJECT`` (a JetStream subject) or ``kafka:TOPIC``.
A message id is a UUID derived (UUIDv5) from the ledger's database and schema, the effect key,
the effect version being written and the message's sequence number within the effect. A
retry of an effect that did not commit publishes the same messages under the same ids; a
committed effect's messages are written once, and a re-send of one (a relay crashed between
sending and marking it delivered) carries the id the broker or consumer has seen already.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from eos_airflow.errors import MessageError

#: Destination schemes a relay can deliver to.
SCHEMES = ("nats", "kafka")
#: Header carrying the message id: JetStream deduplicates on ``Nats-Msg-Id``; Kafka has no
#: broker-side deduplication across producer sessions, so consumers deduplicate on this one.
NATS_MSG_ID_HEADER = "Nats-Msg-Id"
KAFKA_MSG_ID_HEADER = "eos-message-id"
#: Namespace of the UUIDv5 message ids (fixed: changing it would change every id).
MESSAGE_NAMESPACE = uuid.UUID("7d0c3f4e-5c2a-5e49-9a57-3e0b5f0c6a11")

_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_NATS_TOKEN = re.compile(r"^[^\s.*>]+$")


@dataclass(frozen=True)
class Destination:
    """A parsed ``scheme:name`` destination."""

    scheme: str
    name: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.name}"


def parse_destination(destination: object) -> Destination:
    """Parse ``nats:SUBJECT`` or ``kafka:TOPIC``; raise :class:`MessageError` otherwise."""
    if not isinstance(destination, str) or ":" not in destination:
        raise MessageError(
            f"destination {destination!r} is not 'scheme:name'; use 'nats:SUBJECT' "
            "(e.g. 'nats:alerts.high') or 'kafka:TOPIC' (e.g. 'kafka:alerts')"
        )
    scheme, _, name = destination.partition(":")
    if scheme not in SCHEMES:
        raise MessageError(
            f"destination {destination!r} has unknown scheme {scheme!r}; "
            f"known schemes: {', '.join(SCHEMES)} (e.g. 'nats:alerts.high', 'kafka:alerts')"
        )
    if scheme == "kafka" and not _KAFKA_TOPIC.match(name):
        raise MessageError(
            f"destination {destination!r}: {name!r} is not a Kafka topic name "
            "(1-249 characters of letters, digits, '.', '_' and '-')"
        )
    if scheme == "nats" and not all(_NATS_TOKEN.match(token) for token in name.split(".")):
        raise MessageError(
            f"destination {destination!r}: {name!r} is not a NATS subject to publish to "
            "(dot-separated tokens without spaces or wildcards, e.g. 'alerts.high')"
        )
    return Destination(scheme, name)


def message_id(database: str, schema: str, key: str, version: int, seq: int) -> uuid.UUID:
    """The deterministic id of message ``seq`` of version ``version`` of effect ``key``."""
    return uuid.uuid5(MESSAGE_NAMESPACE, json.dumps([database, schema, key, version, seq]))


def encode_payload(payload: Any, destination: str) -> str:
    """The payload as JSON text; raise :class:`MessageError` (nothing written) if it is not
    JSON."""
    try:
        text = json.dumps(payload, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise MessageError(
            f"message to {destination!r}: the payload must be JSON (dict, list, str, int, "
            f"float, bool or None), got {type(payload).__name__}: {exc}; convert it first, "
            "e.g. str() a datetime or .decode() bytes"
        ) from None
    if "\x00" in text:
        raise MessageError(
            f"message to {destination!r}: the payload contains a NUL "
            "character, which PostgreSQL cannot store"
        )
    return text


def check_headers(headers: Mapping[str, str] | None, destination: str) -> dict[str, str]:
    """Headers as a plain ``{str: str}`` dict; the id headers are set by the relay."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise MessageError(
            f"message to {destination!r}: headers must be a dict of str to str, got {headers!r}"
        )
    reserved = {NATS_MSG_ID_HEADER.lower(), KAFKA_MSG_ID_HEADER}
    clash = sorted(k for k in headers if k.lower() in reserved)
    if clash:
        raise MessageError(
            f"message to {destination!r}: header {clash[0]!r} is set by the "
            "relay (it carries the message id); remove it"
        )
    return dict(headers)


@dataclass(frozen=True)
class OutboxMessage:
    """One undelivered outbox row, as a relay sends it."""

    id: int
    message_id: str
    destination: Destination
    key: str | None
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        """The payload as compact JSON bytes (the same bytes on every re-send)."""
        return json.dumps(self.payload, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = [
    "Destination",
    "MessageError",
    "OutboxMessage",
    "encode_payload",
    "message_id",
    "parse_destination",
]
