"""Adapters tier: ``OutboxRelayOperator``, the outbox delivered to NATS JetStream and Kafka.

A thin layer over :class:`eos_airflow.relay.loop.Relay`: it opens the sinks from Airflow
connections, drains the outbox of ``conn_id``'s ledger and reports what it delivered. It is
not itself an effect: delivering is idempotent by message id, so every try simply sends
what is still undelivered. For continuous delivery run ``eos-airflow outbox relay`` (or
:func:`~eos_airflow.relay.loop.relay_forever`) as a service instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from eos_airflow import config
from eos_airflow.errors import ConfigurationError, EosError
from eos_airflow.hooks.ledger import connect_factory
from eos_airflow.hooks.nats import NatsHook
from eos_airflow.ledger.keys import check_schema
from eos_airflow.operators.kafka import kafka_config
from eos_airflow.operators.retry import default_retry_policy
from eos_airflow.protocol.outbox import split_destinations
from eos_airflow.relay.loop import DEFAULT_BATCH_SIZE, Relay
from eos_airflow.relay.sinks import DEFAULT_SEND_TIMEOUT, KafkaSink, NatsSink, Sink


def nats_servers(conn_id: str) -> list[str]:
    """NATS server URLs of Airflow connection ``conn_id`` (:meth:`NatsHook.servers`)."""
    return NatsHook(nats_conn_id=conn_id).servers()


class OutboxRelayOperator(BaseOperator):
    """Send the undelivered outbox messages of ``conn_id``'s ledger and mark them delivered.

    :param conn_id: Airflow Postgres connection of the database whose outbox is relayed.
    :param destinations: exact destinations (``"kafka:alerts"``) or schemes (``"nats:*"``);
        default every scheme with a configured broker.
    :param kafka_conn_id: Airflow Kafka connection (extra JSON = librdkafka config).
    :param nats_url: NATS server URL(s), or ``nats_conn_id``: an Airflow connection (type
        ``nats``, :class:`~eos_airflow.hooks.nats.NatsHook`).
    :param batch_size: messages per batch (one broker round trip and one transaction).
    :param max_messages: stop after this many (default: until the outbox is empty).
    :param relay_id: relay identity (``delivered_by``; Kafka ``transactional.id`` is
        ``eos-outbox-<relay_id>``); default ``<dag_id>.<task_id>``.
    :param ledger_schema: schema holding the ledger (default ``[eos_airflow] ledger_schema``).

    Returns ``{"delivered", "by_destination", "duplicates", "batches"}``.
    """

    ui_color = "#f7e3c7"

    def __init__(
        self,
        *,
        conn_id: str,
        destinations: Sequence[str] | None = None,
        kafka_conn_id: str | None = None,
        nats_url: str | Sequence[str] | None = None,
        nats_conn_id: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_messages: int | None = None,
        relay_id: str | None = None,
        ledger_schema: str | None = None,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        default_retry_policy(self)
        if not conn_id:
            raise ConfigurationError(
                "conn_id is required: the Airflow connection of the database holding the outbox"
            )
        if nats_url and nats_conn_id:
            raise ConfigurationError("give nats_url or nats_conn_id, not both")
        if not (kafka_conn_id or nats_url or nats_conn_id):
            raise ConfigurationError(
                "the relay needs a broker: give kafka_conn_id, nats_url or nats_conn_id"
            )
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
        if destinations is not None:
            try:
                split_destinations(destinations)
            except EosError as exc:
                raise ConfigurationError(str(exc)) from None
        self.conn_id = conn_id
        self.destinations = list(destinations) if destinations is not None else None
        self.kafka_conn_id = kafka_conn_id
        self.nats_url = nats_url
        self.nats_conn_id = nats_conn_id
        self.batch_size = batch_size
        self.max_messages = max_messages
        self.relay_id = relay_id
        self.ledger_schema = check_schema(
            config.ledger_schema() if ledger_schema is None else ledger_schema
        )
        self.send_timeout = send_timeout

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        relay_id = self.relay_id or f"{ti.dag_id}.{ti.task_id}"
        sinks: dict[str, Sink] = {}
        conn = None
        try:
            conn = connect_factory(self.conn_id)()
            if self.kafka_conn_id:
                sinks["kafka"] = KafkaSink(
                    kafka_config(self.kafka_conn_id),
                    transactional_id=f"eos-outbox-{relay_id}",
                    timeout=self.send_timeout,
                )
            if self.nats_url or self.nats_conn_id:
                servers = self.nats_url or nats_servers(str(self.nats_conn_id))
                sinks["nats"] = NatsSink(servers, timeout=self.send_timeout)
            relay = Relay(
                conn,
                sinks,
                schema=self.ledger_schema,
                destinations=self.destinations,
                relay_id=relay_id,
                batch_size=self.batch_size,
                attempt=ti.try_number,
            )
            stats = relay.drain(self.max_messages)
        finally:
            for sink in sinks.values():
                sink.close()
            if conn is not None:
                conn.close()
        self.log.info("outbox relay %s: %s", relay_id, stats.as_dict())
        return stats.as_dict()


__all__ = ["OutboxRelayOperator", "nats_servers"]
