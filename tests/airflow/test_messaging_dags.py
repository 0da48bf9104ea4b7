"""Kafka ingest, the outbox and its relay under real Airflow (`airflow dags test`), with a
mock Kafka cluster (librdkafka) and NATS JetStream as the brokers.

One DAG run covers the chain readings → alert (publishes) → relay → load_alerts, each
crashing at its failpoints on the first tries, and the bad-input tasks next to it.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from eos_airflow.protocol.messages import NATS_MSG_ID_HEADER
from tests.conftest import events
from tests.messaging import conftest as brokers

pytestmark = pytest.mark.airflow

kafka_bootstrap = brokers.kafka_bootstrap  # the mock cluster lives in this test process
nats_stream = brokers.nats_stream


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def test_ingest_publish_relay_consume_with_crashes_at_every_step(
    airflow, db, kafka_bootstrap, nats_stream
):
    stream, prefix = nats_stream
    readings_topic, alerts_topic = (
        f"readings-{uuid.uuid4().hex[:8]}",
        f"alerts-{uuid.uuid4().hex[:8]}",
    )
    partitions = brokers.create_topic(kafka_bootstrap, readings_topic)
    brokers.create_topic(kafka_bootstrap, alerts_topic)
    data = [{"device": f"d{i % 3}", "seq": i, "value": float(i)} for i in range(20)]
    brokers.produce_json(kafka_bootstrap, readings_topic, data, partitions=partitions)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE readings (device text, seq int, value float8)")
        conn.execute("CREATE TABLE alerts_received (device text, seq int, value float8, day text)")
    airflow.env.update(
        {
            "AIRFLOW_CONN_KAFKA": json.dumps(
                {
                    "conn_type": "kafka",
                    "extra": json.dumps({"bootstrap.servers": kafka_bootstrap, "log_level": 0}),
                }
            ),
            "AIRFLOW_CONN_NATS": json.dumps(
                {"conn_type": "generic", "host": "127.0.0.1", "port": 4222}
            ),
            "EOS_TEST_READINGS_TOPIC": readings_topic,
            "EOS_TEST_ALERTS_TOPIC": alerts_topic,
            "EOS_TEST_ALERTS_SUBJECT": f"{prefix}.alerts",
        }
    )

    # try 1 crashes after polling / after sending, try 2 before committing, try 3 after
    run = airflow.dags_test(
        "eos_messaging",
        "2024-01-01",
        failpoints=(
            "after_poll@1=raise,after_send@1=raise,before_commit@2=raise,after_commit@3=raise"
        ),
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-4000:]  # the bad-input tasks fail the run

    # every reading once; offsets at the last message of each partition
    assert query(db, "SELECT seq FROM readings ORDER BY seq") == [(i,) for i in range(20)]
    last = {
        f"kafka:{readings_topic}/{p}": len(range(p, 20, partitions)) - 1 for p in range(partitions)
    }
    assert (
        dict(
            query(
                db,
                "SELECT source, position::int FROM eos.offsets WHERE source LIKE %s",
                [f"kafka:{readings_topic}/%"],
            )
        )
        == last
    )
    with psycopg.connect(db) as conn:
        assert [e for e, _ in events(conn, "readings/2024-01-01")] == [
            "claimed",
            "failed",
            "claimed",
            "failed",
            "claimed",
            "offsets",
            "committed",
            "skipped",
        ]

    # alerts (value > 10): published once, relayed by three tries, each received once
    hot = [r for r in data if r["value"] > 10]
    outbox = query(
        db, "SELECT message_id::text, destination, delivered_by FROM eos.outbox ORDER BY id"
    )
    assert len(outbox) == 2 * len(hot)
    assert {r[2] for r in outbox} == {"eos_messaging.relay"}
    got = brokers.nats_received(stream, f"{prefix}.>")
    assert [h[NATS_MSG_ID_HEADER] for _, _, h in got] == [
        mid for mid, dest, _ in outbox if dest.startswith("nats:")
    ]
    assert [p["seq"] for _, p, _ in got] == [r["seq"] for r in hot]
    # Kafka holds a copy per relay try that sent; load_alerts applied each id once
    copies = brokers.consume_all(kafka_bootstrap, alerts_topic)
    assert len(copies) == 3 * len(hot)
    assert query(db, "SELECT seq, day FROM alerts_received ORDER BY seq") == [
        (r["seq"], "2024-01-01") for r in hot
    ]
    (result,) = query(db, "SELECT result FROM eos.ledger WHERE task_id = 'load_alerts'")[0]
    assert (result["messages"], result["written"], result["duplicates"]) == (
        3 * len(hot),
        len(hot),
        2 * len(hot),
    )
    # try 3 marked them and crashed after its commit: try 4 finds nothing left to send
    assert "outbox relay eos_messaging.relay delivered 0 message(s) in 0 batch(es)" in out

    # bad input: clear errors, no retry, nothing written
    assert "Kafka topic 'no-such-topic' does not exist" in out
    assert "Airflow connection 'no_such_kafka' is not defined; create a Kafka connection" in out
    assert "Airflow connection 'no_such_nats' is not defined" in out
    assert "the payload must be JSON" in out
    assert "destination 'sqs:alerts' has unknown scheme 'sqs'" in out
    states = dict(query(db, "SELECT task_id, state::text FROM eos.ledger"))
    assert states["missing_topic"] == "failed" and states["non_json_payload"] == "failed"
    assert "unknown_kafka_connection" not in states  # failed before claiming
