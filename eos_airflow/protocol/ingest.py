"""Protocol tier: Kafka → PostgreSQL exactly once: the core of ``KafkaToPostgresOperator``.

The consumer group plays no part. Inside one effect (one transaction on the target
database) :func:`ingest_batch`:

1. reads each partition's last consumed offset from ``eos.offsets`` (source
   ``kafka:TOPIC/PARTITION``; reading locks the source until the transaction ends, so two
   runs cannot consume the same partition at once), assigns the partitions explicitly and
   seeks to the next offset;
2. **polls** a bounded batch (``max_messages``, or until every partition is at its end or
   ``poll_timeout`` passes without a message) with ``isolation.level=read_committed`` and
   ``enable.auto.commit=false``; failpoint ``after_poll``;
3. drops messages whose ``eos-message-id`` the consumer applied before (re-sends by an
   outbox relay), recording the new ids in ``{schema}.inbox``;
4. writes the rows (``table=``: each message value is a JSON object whose keys name columns;
   or a ``process(eos, messages)`` callable) and stages each partition's last offset.

The protocol commits rows, inbox entries, offsets and the ledger mark together. A crash
anywhere before that commit leaves the old offsets: the retry reads the same messages again.
A crash after it finds the effect committed. Nothing is skipped and nothing repeats.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg import sql

from eos_airflow import failpoints
from eos_airflow.errors import ConfigurationError, KafkaDataLostError, KafkaError
from eos_airflow.ledger.store import LedgerStore
from eos_airflow.protocol.effect import Effect
from eos_airflow.protocol.messages import KAFKA_MSG_ID_HEADER, MessageError

if TYPE_CHECKING:
    from confluent_kafka import Message

#: Seconds a poll may wait for the next message before the batch ends.
DEFAULT_POLL_TIMEOUT = 5.0
#: Messages per batch (one effect). Bounded so that a task's transaction stays short.
DEFAULT_MAX_MESSAGES = 10_000
#: Settings that make the guarantee; a connection's extra may not override them.
FORCED_CONSUMER_CONFIG = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "isolation.level": "read_committed",
    "enable.partition.eof": True,
}
#: Seconds to wait for topic metadata.
METADATA_TIMEOUT = 10.0


@dataclass(frozen=True)
class KafkaMessage:
    """One consumed message, as ``process(eos, messages)`` receives it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None] = field(default_factory=dict)
    timestamp_ms: int | None = None

    @property
    def source(self) -> str:
        return f"kafka:{self.topic}/{self.partition}"

    @property
    def message_id(self) -> str | None:
        """The outbox message id (``eos-message-id`` header), if a relay sent it."""
        raw = self.headers.get(KAFKA_MSG_ID_HEADER)
        return raw.decode() if raw is not None else None

    def json(self) -> Any:
        """The value decoded as JSON; :class:`MessageError` names the message otherwise."""
        try:
            return json.loads(self.value) if self.value is not None else None
        except ValueError as exc:
            raise MessageError(
                f"message {self.source}@{self.offset} is not JSON ({exc}); load it with "
                "process= to handle other formats, or fix the producer"
            ) from None


def consumer_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The consumer settings used: the connection's, plus the forced ones."""
    if "bootstrap.servers" not in config:
        raise ConfigurationError(
            "the Kafka connection has no 'bootstrap.servers'; set it in "
            "the connection's extra JSON, e.g. "
            '{"bootstrap.servers": "broker:9092"}'
        )
    # fetch.wait.max.ms: a partition at its end answers a fetch after this long; the batch
    # ends when every partition did, so the librdkafka default (500 ms) would idle.
    # auto.offset.reset=error: a stored offset that the broker no longer has (retention
    # deleted the messages before they were loaded) fails the task instead of silently
    # jumping ahead; a partition without a stored offset starts at its beginning anyway.
    merged = {
        "group.id": "eos-airflow",
        "auto.offset.reset": "error",
        "fetch.wait.max.ms": 50,
        **config,
    }
    merged.update(FORCED_CONSUMER_CONFIG)
    return merged


def _consumed(m: Message[Any, Any]) -> KafkaMessage:
    """A message consumed without error: it has a topic, a partition and an offset."""
    topic, partition, offset = m.topic(), m.partition(), m.offset()
    if topic is None or partition is None or offset is None:
        raise KafkaError(
            f"Kafka gave a message without its position ({topic}/{partition} at {offset}); "
            "nothing was written, retry"
        )
    headers = m.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    return KafkaMessage(
        topic,
        partition,
        offset,
        m.key(),
        m.value(),
        {k: v.encode() if isinstance(v, str) else v for k, v in pairs},
        m.timestamp()[1],
    )


def ingest_batch(
    eos: Effect,
    config: Mapping[str, Any],
    topics: Sequence[str],
    *,
    write: Callable[[Effect, list[KafkaMessage]], Any],
    max_messages: int = DEFAULT_MAX_MESSAGES,
    poll_timeout: float = DEFAULT_POLL_TIMEOUT,
    dedup_consumer: str | None = None,
) -> dict[str, Any]:
    """Consume one bounded batch of ``topics`` into ``eos``'s transaction (see module doc).

    Returns ``{"messages", "written", "duplicates", "offsets"}``; ``offsets`` maps each
    partition read to its last consumed offset.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from confluent_kafka import KafkaError as CKError

    if max_messages < 1:
        raise ConfigurationError(f"max_messages must be >= 1, got {max_messages}")
    consumer = Consumer(consumer_config(config))
    try:
        assignment = []
        ends: set[tuple[str | None, int | None]] = set()
        for topic in topics:
            for partition in _partitions(consumer, topic):
                last = eos.offsets.get(f"kafka:{topic}/{partition}")
                start = OFFSET_BEGINNING if last is None else int(last) + 1
                assignment.append(TopicPartition(topic, partition, start))
        consumer.assign(assignment)
        parts = {(tp.topic, tp.partition) for tp in assignment}
        messages: list[KafkaMessage] = []
        deadline = time.monotonic() + poll_timeout
        while len(messages) < max_messages and ends != parts:
            # consume() returns when it has the count or the timeout passed: a short
            # timeout keeps the batch from idling once every partition is at its end.
            batch = consumer.consume(
                min(max_messages - len(messages), 1000),
                timeout=max(0.0, min(0.1, deadline - time.monotonic())),
            )
            if not batch and time.monotonic() >= deadline:
                break
            for m in batch:
                error = m.error()
                if error is not None:
                    if error.code() == CKError._PARTITION_EOF:
                        ends.add((m.topic(), m.partition()))
                        continue
                    if error.code() == CKError._AUTO_OFFSET_RESET:
                        raise KafkaDataLostError(
                            f"kafka:{m.topic()}/{m.partition()}: the offset after the one "
                            f"stored in the ledger is gone from the broker ({error.str()}), "
                            "so messages were deleted before they were loaded; nothing was "
                            "written. Raise the topic's retention, then set the position "
                            "deliberately (UPDATE eos.offsets) to accept the gap"
                        )
                    raise KafkaError(
                        f"Kafka error on {m.topic()}/{m.partition()}: "
                        f"{error.str()}; nothing was written, retry"
                    )
                ends.discard((m.topic(), m.partition()))
                messages.append(_consumed(m))
            if batch:
                deadline = time.monotonic() + poll_timeout
    finally:
        consumer.close()
    failpoints.check("after_poll", attempt=eos.attempt)

    fresh = _dedup(eos, messages, dedup_consumer) if dedup_consumer else messages
    written = write(eos, fresh)
    offsets: dict[str, int] = {}
    for message in messages:
        offsets[message.source] = max(message.offset, offsets.get(message.source, -1))
    for source, offset in offsets.items():
        eos.offsets[source] = offset
    return {
        "messages": len(messages),
        "written": written if written is not None else len(fresh),
        "duplicates": len(messages) - len(fresh),
        "offsets": dict(sorted(offsets.items())),
    }


def _partitions(consumer: Any, topic: str) -> list[int]:
    from confluent_kafka import KafkaException

    if not isinstance(topic, str) or not topic:
        raise ConfigurationError(f"topic names must be non-empty strings, got {topic!r}")
    try:
        metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT)
    except KafkaException as exc:
        raise KafkaError(
            f"cannot read Kafka metadata for topic {topic!r} "
            f"({exc.args[0].str()}); check bootstrap.servers"
        ) from exc
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        reason = found.error.str() if found is not None and found.error else "not found"
        raise ConfigurationError(
            f"Kafka topic {topic!r} does not exist ({reason}); create it or fix topics="
        )
    return sorted(found.partitions)


def _dedup(eos: Effect, messages: list[KafkaMessage], consumer: str) -> list[KafkaMessage]:
    """Messages without an id, and those whose id this consumer has not applied yet."""
    first: dict[str, KafkaMessage] = {}
    for m in messages:
        if m.message_id is not None and m.message_id not in first:
            first[m.message_id] = m
    new: set[str] = set()
    if first:
        new = LedgerStore(eos.conn, eos.schema).inbox_accept(
            consumer, list(first), [f"{m.source}@{m.offset}" for m in first.values()]
        )
    return [
        m
        for m in messages
        if m.message_id is None or (m.message_id in new and first[m.message_id] is m)
    ]


def table_writer(table: str) -> Callable[[Effect, list[KafkaMessage]], int]:
    """A writer inserting each message's JSON object into ``table`` in one statement
    (``jsonb_populate_recordset``: keys name columns, other keys are ignored, columns without
    a key get NULL)."""
    parts = table.split(".")
    if not table or len(parts) > 2 or not all(parts):
        raise ConfigurationError(f"table {table!r} is not 'name' or 'schema.name'")
    statement = sql.SQL(
        "INSERT INTO {table} SELECT * FROM jsonb_populate_recordset(NULL::{table}, %s::jsonb)"
    ).format(table=sql.Identifier(*parts))

    def write(eos: Effect, messages: list[KafkaMessage]) -> int:
        rows = []
        for m in messages:
            value = m.json()
            if not isinstance(value, dict):
                raise MessageError(
                    f"message {m.source}@{m.offset} is JSON but not an object "
                    f"({type(value).__name__}); table= loads objects whose keys name "
                    f"{table}'s columns: use process= for other shapes"
                )
            rows.append(value)
        if rows:
            eos.conn.execute(statement, [json.dumps(rows)])
        return len(rows)

    return write


__all__ = ["KafkaError", "KafkaMessage", "consumer_config", "ingest_batch", "table_writer"]
