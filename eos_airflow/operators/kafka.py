"""Adapters tier: ``KafkaToPostgresOperator``, Kafka partitions into PostgreSQL exactly once.

The consumed offsets are kept in the ledger.

The work is :func:`eos_airflow.protocol.ingest.ingest_batch` inside one effect; this module
resolves the Airflow connection and maps errors. The Kafka connection is Airflow's ``kafka``
type (apache-airflow-providers-apache-kafka) or any connection whose extra JSON holds the
librdkafka client config, e.g. ``{"bootstrap.servers": "broker:9092"}``; a host/port on the
connection is used as ``bootstrap.servers`` when the extra has none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from eos_airflow.errors import ConfigurationError
from eos_airflow.operators.base import ExactlyOnceBaseOperator
from eos_airflow.protocol.effect import Effect
from eos_airflow.protocol.ingest import (
    DEFAULT_MAX_MESSAGES,
    DEFAULT_POLL_TIMEOUT,
    KafkaMessage,
    ingest_batch,
    table_writer,
)


def kafka_config(conn_id: str) -> dict[str, Any]:
    """librdkafka settings of Airflow connection ``conn_id`` (its extra JSON)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise ConfigurationError(
            f"Airflow connection {conn_id!r} is not defined; create a Kafka connection, e.g. "
            f'AIRFLOW_CONN_{conn_id.upper()}=\'{{"conn_type": "kafka", "extra": '
            '{"bootstrap.servers": "broker:9092"}}\''
        ) from None
    config = dict(connection.extra_dejson or {})
    if "bootstrap.servers" not in config and connection.host:
        port = f":{connection.port}" if connection.port else ""
        config["bootstrap.servers"] = f"{connection.host}{port}"
    if "bootstrap.servers" not in config:
        raise ConfigurationError(
            f"Airflow connection {conn_id!r} has no 'bootstrap.servers' in its extra JSON "
            '(and no host); set it, e.g. {"bootstrap.servers": "broker:9092"}'
        )
    return config


class KafkaToPostgresOperator(ExactlyOnceBaseOperator):
    """Load a bounded batch from Kafka topics into PostgreSQL, exactly once.

    Partitions are assigned explicitly and read from the offsets stored in the target
    database's ledger (``eos.offsets``, source ``kafka:TOPIC/PARTITION``), not from the
    consumer group; rows, offsets and the ledger mark commit in one transaction, so a crash
    anywhere neither skips nor repeats a message. Messages re-sent by an outbox relay (same
    ``eos-message-id`` header) are applied once.

    :param kafka_conn_id: Airflow Kafka connection (extra JSON = librdkafka config).
    :param topics: topic name or names (templated); every partition of each is read.
    :param target_conn_id: Airflow Postgres connection of the target database (with the ledger).
    :param table: target table (templated); each message value is a JSON object whose keys
        name columns. Or give ``process``.
    :param process: ``process(eos, messages)`` writing ``list[KafkaMessage]`` through
        ``eos.conn``; its return value (JSON) is reported as ``written``.
    :param max_messages: bound on messages per run.
    :param poll_timeout: seconds without a message after which the batch ends.
    :param dedup: drop messages whose ``eos-message-id`` this task applied before
        (default on; the ids are kept in the ledger's ``inbox`` table).
    :param key: effect key (templated); default one effect per task instance.

    The parameters every exactly-once operator shares (``key``, ``on_committed``,
    ``ledger_schema``, ``wait_timeout``, ``max_result_bytes``) are those of
    :class:`~eos_airflow.operators.base.ExactlyOnceBaseOperator`.

    Returns ``{"messages", "written", "duplicates", "offsets"}``.
    """

    template_fields: Sequence[str] = ("topics", "table")
    ui_color = "#e8d9f7"

    def __init__(
        self,
        *,
        kafka_conn_id: str,
        topics: str | Sequence[str],
        target_conn_id: str,
        table: str | None = None,
        process: Callable[[Effect, list[KafkaMessage]], Any] | None = None,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        poll_timeout: float = DEFAULT_POLL_TIMEOUT,
        dedup: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id=target_conn_id, **kwargs)
        if (table is None) == (process is None):
            raise ConfigurationError(
                "give exactly one of table= (a target table for JSON-object "
                "messages) or process= (a callable process(eos, messages))"
            )
        if not kafka_conn_id:
            raise ConfigurationError(
                "kafka_conn_id is required: the Airflow connection of the Kafka cluster"
            )
        if not topics:
            raise ConfigurationError("topics is required: a topic name or a list of them")
        if max_messages < 1:
            raise ConfigurationError(f"max_messages must be >= 1, got {max_messages}")
        if poll_timeout <= 0:
            raise ConfigurationError(f"poll_timeout must be > 0 seconds, got {poll_timeout}")
        self.kafka_conn_id = kafka_conn_id
        self.target_conn_id = target_conn_id
        self.topics = topics
        self.table = table
        self.process = process
        self.max_messages = max_messages
        self.poll_timeout = poll_timeout
        self.dedup = dedup

    def execute(self, context: Any) -> Any:
        config = kafka_config(self.kafka_conn_id)
        topics = [self.topics] if isinstance(self.topics, str) else list(self.topics)
        write = table_writer(self.table) if self.table is not None else self.process
        assert write is not None
        consumer = f"{self.dag_id}.{self.task_id}" if self.dedup else None

        def ingest(eos: Effect) -> dict[str, Any]:
            return ingest_batch(
                eos,
                config,
                topics,
                write=write,
                max_messages=self.max_messages,
                poll_timeout=self.poll_timeout,
                dedup_consumer=consumer,
            )

        return self.run_effect(context, ingest)


__all__ = ["KafkaToPostgresOperator", "kafka_config"]
