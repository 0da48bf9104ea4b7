"""API tier: delivers the outbox to brokers, after the effect that wrote it has committed.

- ``eos.publish(destination, payload, key=None, headers=None)`` writes a message to
  ``{schema}.outbox`` in the effect's transaction (:mod:`eos_airflow.protocol.outbox`), under
  a deterministic id (:mod:`eos_airflow.protocol.messages`).
- :class:`~eos_airflow.relay.loop.Relay` (and :func:`~eos_airflow.relay.loop.relay_forever`)
  delivers undelivered rows to NATS JetStream or Kafka (:mod:`.sinks`) and marks them.
- Kafka ingest (consume partitions into PostgreSQL with the offsets in the ledger) is
  :func:`eos_airflow.protocol.ingest.ingest_batch`.

Nothing here imports Airflow; ``OutboxRelayOperator`` (eos_airflow/operators/outbox.py) is a
thin layer over it.
"""

from __future__ import annotations

from eos_airflow.protocol.messages import MessageError, OutboxMessage, parse_destination
from eos_airflow.relay.loop import Relay, RelayStats, relay_forever
from eos_airflow.relay.sinks import DeliveryError, KafkaSink, NatsSink

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
