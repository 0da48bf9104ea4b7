"""Data movement with exactly-once effects: the transactional outbox and Kafka ingest.

- ``eos.publish(destination, payload, key=None, headers=None)`` writes a message to
  ``{schema}.outbox`` in the effect's transaction (:mod:`.store`), under a deterministic id
  (:mod:`.message`).
- :class:`~eos_airflow.outbox.relay.Relay` (and :func:`~eos_airflow.outbox.relay.relay_forever`)
  delivers undelivered rows to NATS JetStream or Kafka (:mod:`.sinks`) and marks them.
- :func:`~eos_airflow.outbox.ingest.ingest_batch` consumes Kafka partitions into PostgreSQL
  with the offsets in the ledger (``eos.offsets``) and re-sent messages dropped by id.

Nothing here imports Airflow; ``OutboxRelayOperator`` and ``KafkaToPostgresOperator``
(eos_airflow/operators) are thin layers over it.
"""

from __future__ import annotations

from eos_airflow.outbox.message import MessageError, OutboxMessage, parse_destination
from eos_airflow.outbox.relay import Relay, RelayStats, relay_forever
from eos_airflow.outbox.sinks import DeliveryError, KafkaSink, NatsSink

__all__ = [
    "DeliveryError",
    "KafkaSink",
    "MessageError",
    "NatsSink",
    "OutboxMessage",
    "Relay",
    "RelayStats",
    "parse_destination",
    "relay_forever",
]
