"""Real brokers for the messaging tests: librdkafka's mock Kafka cluster and NATS JetStream.

The mock cluster (``test.mock.num.brokers``) is a Kafka-protocol broker set on 127.0.0.1
owned by one client of this process: other clients, in this process or in subprocesses
such as ``airflow dags test``, reach it through its bootstrap address. It lives as long as
the owning client, so the session fixture keeps that client open.

NATS JetStream runs as a service on 127.0.0.1:4222 (``EOS_TEST_NATS_URL`` overrides it);
each test gets its own stream (with a duplicate window) and subject prefix.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator

import pytest

confluent_kafka = pytest.importorskip("confluent_kafka")
nats = pytest.importorskip("nats")

NATS_URL = os.environ.get("EOS_TEST_NATS_URL", "nats://127.0.0.1:4222")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    owner = confluent_kafka.Producer({"test.mock.num.brokers": 3, "log_level": 0})
    brokers = owner.list_topics(timeout=10).brokers.values()
    yield ",".join(f"{b.host}:{b.port}" for b in sorted(brokers, key=lambda b: b.id))
    owner.flush(1)
    del owner


def create_topic(bootstrap: str, topic: str) -> int:
    """Create ``topic`` on the mock cluster (it auto-creates topics that a producer asks
    about); return its partition count."""
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "log_level": 0})
    found = producer.list_topics(topic, timeout=10).topics[topic]
    assert found.error is None, found.error
    return len(found.partitions)


def produce_json(bootstrap: str, topic: str, rows: list[dict], *, partitions: int) -> None:
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "log_level": 0, "enable.idempotence": True}
    )
    for i, row in enumerate(rows):
        producer.produce(topic, json.dumps(row).encode(), partition=i % partitions)
    assert producer.flush(10) == 0


def consume_all(bootstrap: str, topic: str, isolation: str = "read_committed") -> list:
    """Every committed message of ``topic`` from the beginning (a read_committed consumer)."""
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "isolation.level": isolation,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign(
        [confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in parts]
    )
    out, ends = [], set()
    while len(ends) < len(parts):
        for m in consumer.consume(1000, timeout=0.1):
            if m.error() is None:
                out.append(m)
                ends.discard(m.partition())
            elif m.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                ends.add(m.partition())
    consumer.close()
    return out


@pytest.fixture
def kafka_topic(kafka_bootstrap: str) -> str:
    topic = f"t-{uuid.uuid4().hex[:12]}"
    create_topic(kafka_bootstrap, topic)
    return topic


async def _with_js(fn):
    nc = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def nats_received(stream: str, subject: str) -> list[tuple[str, dict, dict]]:
    """(subject, payload, headers) of every message in ``stream`` on ``subject``, read by
    an ephemeral ordered subscriber."""

    async def read(js):
        info = await js.stream_info(stream)
        sub = await js.subscribe(subject, ordered_consumer=True, stream=stream)
        out = []
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=5)
            out.append((msg.subject, json.loads(msg.data), dict(msg.headers or {})))
        await sub.unsubscribe()
        return out

    return asyncio.run(_with_js(read))


@pytest.fixture
def nats_stream() -> Iterator[tuple[str, str]]:
    """(stream name, subject prefix) of a fresh stream with a two-minute duplicate window."""
    name = f"EOSTEST_{uuid.uuid4().hex[:10].upper()}"
    prefix = f"eostest.{name.lower()}"

    async def create(js):
        await js.add_stream(name=name, subjects=[f"{prefix}.>"], duplicate_window=120.0)

    async def delete(js):
        await js.delete_stream(name)

    asyncio.run(_with_js(create))
    yield name, prefix
    asyncio.run(_with_js(delete))
