"""Kafka → PostgreSQL (the core of ``KafkaToPostgresOperator``) on librdkafka's mock cluster."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import psycopg
import pytest

from eos_airflow import Ledger
from eos_airflow.errors import ConfigurationError, FailpointError
from eos_airflow.failpoints import EXIT_CODE
from eos_airflow.protocol.ingest import KafkaError, ingest_batch, table_writer
from eos_airflow.relay import KafkaSink, MessageError, Relay
from tests.conftest import ROOT, events
from tests.messaging.conftest import produce_json

PARTITIONS = 4  # the mock cluster's default for a new topic


def readings(n: int, start: int = 0) -> list[dict]:
    return [{"device": f"d{i % 3}", "seq": i, "value": i * 1.5} for i in range(start, start + n)]


@pytest.fixture
def target(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE readings (device text, seq int, value float8)")
    return db


def rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT device, seq, value FROM readings ORDER BY seq").fetchall()


def offsets(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT source, position::bigint FROM eos.offsets"))


def expected(data: list[dict]) -> list[tuple]:
    return [(r["device"], r["seq"], r["value"]) for r in data]


def last_offsets(topic: str, n: int) -> dict[str, int]:
    """Last offset per partition after ``n`` messages spread round-robin (one producer)."""
    out: dict[str, int] = {}
    for p in range(min(n, PARTITIONS)):
        out[f"kafka:{topic}/{p}"] = len(range(p, n, PARTITIONS)) - 1
    return out


def ingest(
    ledger: Ledger,
    key: str,
    bootstrap: str,
    topic: str,
    *,
    attempt: int = 1,
    max_messages: int = 1000,
    table: str = "readings",
):
    def fn(eos):
        return ingest_batch(
            eos,
            {"bootstrap.servers": bootstrap, "log_level": 0},
            [topic],
            write=table_writer(table),
            max_messages=max_messages,
            poll_timeout=2.0,
            dedup_consumer="test.ingest",
        )

    return ledger.run(key, fn, attempt=attempt)


def test_batches_continue_from_the_ledger_offsets(ledger, target, kafka_bootstrap, kafka_topic):
    data = readings(10)
    produce_json(kafka_bootstrap, kafka_topic, data, partitions=PARTITIONS)
    first = ingest(ledger, "ingest/1", kafka_bootstrap, kafka_topic, max_messages=6)
    assert first["messages"] == 6 and first["written"] == 6
    second = ingest(ledger, "ingest/2", kafka_bootstrap, kafka_topic)
    assert second["messages"] == 4
    assert rows(target) == expected(data)
    assert offsets(target) == last_offsets(kafka_topic, 10)
    assert ingest(ledger, "ingest/3", kafka_bootstrap, kafka_topic)["messages"] == 0
    more = readings(5, start=10)
    produce_json(kafka_bootstrap, kafka_topic, more, partitions=PARTITIONS)
    assert ingest(ledger, "ingest/4", kafka_bootstrap, kafka_topic)["messages"] == 5
    assert rows(target) == expected(data + more)
    with psycopg.connect(target) as conn:
        assert [e for e, _ in events(conn, "ingest/1")] == ["claimed", "offsets", "committed"]


CHILD = """
import json, os
from eos_airflow import Ledger
from eos_airflow.protocol.ingest import KafkaError, ingest_batch, table_writer
spec = json.loads(os.environ["INGEST_SPEC"])
with Ledger(spec["dsn"]) as ledger:
    ledger.run(spec["key"], lambda eos: ingest_batch(
        eos, {"bootstrap.servers": spec["bootstrap"], "log_level": 0}, [spec["topic"]],
        write=table_writer("readings"), poll_timeout=2.0, dedup_consumer="test.ingest"))
"""


@pytest.mark.parametrize("action", ["raise", "exit"])
@pytest.mark.parametrize("step", ["after_claim", "after_poll", "before_commit", "after_commit"])
def test_crash_at_every_step_then_retry_loads_each_message_once(
    ledger, target, kafka_bootstrap, kafka_topic, monkeypatch, step, action
):
    data = readings(12)
    produce_json(kafka_bootstrap, kafka_topic, data, partitions=PARTITIONS)
    if action == "exit":
        env = {
            **os.environ,
            "EOS_FAILPOINTS": f"{step}=exit",
            "PYTHONPATH": str(ROOT),
            "INGEST_SPEC": json.dumps(
                {
                    "dsn": target,
                    "key": "ingest/x",
                    "topic": kafka_topic,
                    "bootstrap": kafka_bootstrap,
                }
            ),
        }
        crashed = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
        )
        assert crashed.returncode == EXIT_CODE, crashed.stderr[-3000:]
    else:
        monkeypatch.setenv("EOS_FAILPOINTS", f"{step}=raise")
        with pytest.raises(FailpointError):
            ingest(ledger, "ingest/x", kafka_bootstrap, kafka_topic)
        monkeypatch.delenv("EOS_FAILPOINTS")
    committed = step == "after_commit"
    assert len(rows(target)) == (12 if committed else 0)
    # the retry (try 2 of the same effect), then a later batch that finds nothing new
    result = ingest(ledger, "ingest/x", kafka_bootstrap, kafka_topic, attempt=2)
    assert result["messages"] == 12  # computed once: stored result when it was committed
    assert ingest(ledger, "ingest/y", kafka_bootstrap, kafka_topic)["messages"] == 0
    assert rows(target) == expected(data)
    assert offsets(target) == last_offsets(kafka_topic, 12)


def test_relay_resends_are_loaded_once_by_message_id(
    ledger, target, conn, kafka_bootstrap, kafka_topic, monkeypatch
):
    def publish(eos):
        for r in readings(5):
            eos.publish(f"kafka:{kafka_topic}", r, key=r["device"])
        return {}

    ledger.run("alerts/1", publish)
    sink = KafkaSink(
        {"bootstrap.servers": kafka_bootstrap, "log_level": 0}, transactional_id="eos-outbox-dedup"
    )
    monkeypatch.setenv("EOS_FAILPOINTS", "after_send=raise")  # Kafka committed, row not marked
    with pytest.raises(FailpointError):
        Relay(conn, {"kafka": sink}).drain()
    monkeypatch.delenv("EOS_FAILPOINTS")
    assert Relay(conn, {"kafka": sink}).drain().total == 5
    sink.close()
    result = ingest(ledger, "ingest/1", kafka_bootstrap, kafka_topic)
    assert (result["messages"], result["written"], result["duplicates"]) == (10, 5, 5)
    assert rows(target) == expected(readings(5))
    with psycopg.connect(target) as c:
        assert c.execute(
            "SELECT count(*) FROM eos.inbox WHERE consumer = 'test.ingest'"
        ).fetchone() == (5,)


def test_missing_topic_fails_clearly_and_writes_nothing(ledger, target, kafka_bootstrap):
    with pytest.raises(
        ConfigurationError,
        match="Kafka topic 'no-such-topic' does not exist "
        r"\(Broker: Unknown topic or partition\); "
        "create it or fix topics=",
    ):
        ingest(ledger, "ingest/1", kafka_bootstrap, "no-such-topic")
    assert rows(target) == [] and offsets(target) == {}
    with psycopg.connect(target) as conn:
        assert events(conn, "ingest/1") == [("claimed", 1), ("failed", 1)]


def test_non_object_message_fails_naming_it_and_writes_nothing(
    ledger, target, kafka_bootstrap, kafka_topic
):
    produce_json(
        kafka_bootstrap, kafka_topic, [{"device": "a", "seq": 1, "value": 1.0}], partitions=1
    )
    produce_json(kafka_bootstrap, kafka_topic, [[1, 2]], partitions=1)  # type: ignore[list-item]
    with pytest.raises(
        MessageError,
        match=rf"message kafka:{kafka_topic}/0@1 is JSON but not "
        "an object .list.; table= loads objects",
    ):
        ingest(ledger, "ingest/1", kafka_bootstrap, kafka_topic)
    assert rows(target) == [] and offsets(target) == {}


def test_missing_bootstrap_servers_is_a_configuration_error(ledger, target):
    with pytest.raises(ConfigurationError, match="has no 'bootstrap.servers'"):
        ledger.run("ingest/1", lambda eos: ingest_batch(eos, {}, ["t"], write=lambda e, m: 0))


def test_example_dag_process_loads_readings_and_publishes_alerts_in_one_effect(
    ledger, db, kafka_bootstrap, kafka_topic
):
    spec = importlib.util.spec_from_file_location(
        "eos_iot_readings", ROOT / "dags" / "eos_iot_readings.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(example.SETUP_SQL)
    data = [
        {"device": f"pump-{i % 2}", "at": f"2024-01-01T10:{i:02d}:00Z", "celsius": 70.0 + 3 * i}
        for i in range(8)
    ]
    produce_json(kafka_bootstrap, kafka_topic, data, partitions=1)

    def fn(eos):
        return ingest_batch(
            eos,
            {"bootstrap.servers": kafka_bootstrap, "log_level": 0},
            [kafka_topic],
            write=example.load_and_alert,
            poll_timeout=2.0,
        )

    result = ledger.run("iot/1", fn)
    hot = [r for r in data if r["celsius"] > example.THRESHOLD]
    assert result["written"] == {"readings": 8, "alerts": len(hot)}
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM iot_readings").fetchone() == (8,)
        published = conn.execute(
            "SELECT destination, payload->>'celsius' FROM eos.outbox ORDER BY id"
        ).fetchall()
    assert published == [
        d
        for r in hot
        for d in (
            (f"nats:iot.alerts.{r['device']}", str(r["celsius"])),
            ("kafka:iot.alerts", str(r["celsius"])),
        )
    ]


def test_stored_offset_the_broker_no_longer_has_fails_instead_of_skipping(
    ledger, target, kafka_bootstrap, kafka_topic
):
    produce_json(kafka_bootstrap, kafka_topic, readings(3), partitions=1)

    def set_position(eos):
        eos.offsets[f"kafka:{kafka_topic}/0"] = 1000
        return {}

    ledger.run("position", set_position)
    with pytest.raises(
        KafkaError,
        match=rf"kafka:{kafka_topic}/0: the offset after the one "
        "stored in the ledger is gone from the broker",
    ) as err:
        ingest(ledger, "ingest/1", kafka_bootstrap, kafka_topic)
    assert not err.value.retryable
    assert rows(target) == [] and offsets(target)[f"kafka:{kafka_topic}/0"] == 1000
