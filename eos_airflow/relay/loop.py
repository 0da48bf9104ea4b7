"""API tier: the outbox relay: undelivered rows → broker → marked delivered (docs/usage.md,
"Outbox").

One batch is one transaction on the ledger's database:

1. **read**: lock the oldest undelivered rows of the relay's destinations, in id order
   (``FOR UPDATE SKIP LOCKED``: concurrent relays split the backlog instead of blocking);
2. **send**: hand them to the sinks, which return once the broker acknowledged them;
   failpoint ``after_send``;
3. **mark**: set ``delivered_at`` and COMMIT (failpoints ``before_commit``, ``after_commit``).

A crash before 3 commits leaves the rows undelivered: the next batch sends them again under
the same message ids, and the broker (JetStream's duplicate window) or the consumer (Kafka,
by the ``eos-message-id`` header) drops the copy. Messages of one destination are sent in
the order their effects wrote them when one relay serves that destination.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from eos_airflow import failpoints
from eos_airflow.errors import ConfigurationError, LedgerSchemaError
from eos_airflow.protocol.messages import OutboxMessage
from eos_airflow.protocol.outbox import mark_delivered, pending, split_destinations
from eos_airflow.relay.sinks import Sink

log = logging.getLogger(__name__)

#: Rows per batch: one broker round of acks and one transaction each. Larger batches amortise
#: the commit; smaller ones hold fewer row locks while a slow broker acknowledges.
DEFAULT_BATCH_SIZE = 500
#: Seconds an idle relay_forever sleeps before looking for new rows again.
DEFAULT_POLL_INTERVAL = 1.0


@dataclass
class RelayStats:
    """What a relay delivered: messages per destination and broker-dropped duplicates."""

    delivered: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    batches: int = 0

    @property
    def total(self) -> int:
        return sum(self.delivered.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.total,
            "by_destination": dict(sorted(self.delivered.items())),
            "duplicates": self.duplicates,
            "batches": self.batches,
        }


class Relay:
    """Delivers the outbox of one ledger (``conn``, an autocommit connection) to ``sinks``.

    :param sinks: sink per scheme, e.g. ``{"nats": NatsSink(...), "kafka": KafkaSink(...)}``.
    :param destinations: what to deliver: exact destinations (``"kafka:alerts"``) or whole
        schemes (``"nats:*"``); default every scheme that has a sink.
    :param relay_id: identity recorded in ``delivered_by`` (and the Kafka transactional id).
    :param attempt: try number, for failpoints such as ``after_send@1=exit``.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        sinks: Mapping[str, Sink],
        *,
        schema: str = "eos",
        destinations: Sequence[str] | None = None,
        relay_id: str = "eos-outbox",
        batch_size: int = DEFAULT_BATCH_SIZE,
        attempt: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
        self.conn = conn
        self.sinks = dict(sinks)
        self.schema = schema
        self.relay_id = relay_id
        self.batch_size = batch_size
        self.attempt = attempt
        chosen = list(destinations) if destinations else [f"{s}:*" for s in self.sinks]
        if not chosen:
            raise ConfigurationError(
                "the relay has no sinks: give a NATS URL or a Kafka connection"
            )
        self.exact, self.schemes = split_destinations(chosen)
        missing = sorted(
            ({d.split(":", 1)[0] for d in self.exact} | set(self.schemes)) - set(self.sinks)
        )
        if missing:
            raise ConfigurationError(
                f"destinations {chosen} include scheme(s) {', '.join(missing)} but the relay "
                "has no sink for them; configure them (nats_url / kafka_conn_id) or narrow "
                "destinations"
            )

    def __repr__(self) -> str:
        chosen = self.exact + [f"{scheme}:*" for scheme in self.schemes]
        return f"<Relay id={self.relay_id!r} destinations={chosen!r}>"

    def relay_batch(self, stats: RelayStats | None = None) -> int:
        """Deliver one batch; return how many messages it held (0: nothing pending)."""
        stats = stats if stats is not None else RelayStats()
        with self.conn.transaction():
            try:
                messages = pending(
                    self.conn, self.schema, self.exact, self.schemes, self.batch_size
                )
            except (pgerrors.UndefinedTable, pgerrors.InvalidSchemaName) as exc:
                raise LedgerSchemaError(
                    f'the ledger schema "{self.schema}" in database "{self.conn.info.dbname}" '
                    f"has no outbox ({exc.diag.message_primary}); upgrade it with "
                    "`eos-airflow db migrate` (same --dsn or --conn-id)"
                ) from exc
            if not messages:
                return 0
            by_scheme: dict[str, list[OutboxMessage]] = {}
            for message in messages:
                by_scheme.setdefault(message.destination.scheme, []).append(message)
            for scheme, batch in by_scheme.items():
                stats.duplicates += self.sinks[scheme].send(batch)
            failpoints.check("after_send", attempt=self.attempt)
            mark_delivered(self.conn, self.schema, [m.id for m in messages], self.relay_id)
            failpoints.check("before_commit", attempt=self.attempt)
        failpoints.check("after_commit", attempt=self.attempt)
        stats.delivered.update(str(m.destination) for m in messages)
        stats.batches += 1
        return len(messages)

    def drain(self, max_messages: int | None = None) -> RelayStats:
        """Deliver batches until nothing is pending (or ``max_messages`` were delivered)."""
        stats = RelayStats()
        while max_messages is None or stats.total < max_messages:
            if not self.relay_batch(stats):
                break
        log.info(
            "outbox relay %s delivered %s message(s) in %s batch(es), %s duplicate(s) "
            "dropped by the broker",
            self.relay_id,
            stats.total,
            stats.batches,
            stats.duplicates,
        )
        return stats

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()


def relay_forever(
    connect: Callable[[], psycopg.Connection[Any]],
    sinks: Mapping[str, Sink],
    *,
    schema: str = "eos",
    destinations: Sequence[str] | None = None,
    relay_id: str = "eos-outbox",
    batch_size: int = DEFAULT_BATCH_SIZE,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    stop: threading.Event | None = None,
) -> RelayStats:
    """Run a relay until ``stop`` is set: drain, sleep ``poll_interval``, repeat.

    A lost database connection is reopened; a broker error is logged and the batch retried
    after the interval (its rows stay undelivered meanwhile). Returns the totals.
    """
    stop = stop or threading.Event()
    total = RelayStats()
    conn: psycopg.Connection[Any] | None = None
    relay: Relay | None = None
    try:
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect()
                    relay = Relay(
                        conn,
                        sinks,
                        schema=schema,
                        destinations=destinations,
                        relay_id=relay_id,
                        batch_size=batch_size,
                    )
                assert relay is not None
                while not stop.is_set() and relay.relay_batch(total):
                    pass
            except (psycopg.OperationalError, ConnectionError) as exc:
                log.warning("outbox relay %s: %s; reconnecting", relay_id, exc)
                if conn is not None:
                    conn.close()
            except Exception as exc:
                if getattr(exc, "retryable", False):
                    log.warning(
                        "outbox relay %s: %s; retrying in %ss", relay_id, exc, poll_interval
                    )
                else:
                    raise
            stop.wait(poll_interval)
    finally:
        if conn is not None:
            conn.close()
    return total


__all__ = ["DEFAULT_BATCH_SIZE", "Relay", "RelayStats", "relay_forever"]
