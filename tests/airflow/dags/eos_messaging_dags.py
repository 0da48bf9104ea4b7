"""DAGs driven by tests/airflow/test_messaging_dags.py: Kafka ingest, the outbox and its relay.

Broker addresses come through Airflow connections (``kafka``, ``nats``); topic and subject
names through environment variables, so each test run uses fresh ones.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

import pendulum
from airflow.sdk import dag, task

from eos_airflow.operators.kafka import KafkaToPostgresOperator
from eos_airflow.operators.outbox import OutboxRelayOperator

ARGS = {"retries": 3, "retry_delay": timedelta(seconds=1)}
START = pendulum.datetime(2024, 1, 1, tz="UTC")
READINGS = os.environ.get("EOS_TEST_READINGS_TOPIC", "readings")
ALERTS = os.environ.get("EOS_TEST_ALERTS_TOPIC", "alerts")
SUBJECT = os.environ.get("EOS_TEST_ALERTS_SUBJECT", "eostest.alerts")


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def eos_messaging():
    load = KafkaToPostgresOperator(
        task_id="load",
        kafka_conn_id="kafka",
        topics=READINGS,
        target_conn_id="warehouse",
        table="readings",
        poll_timeout=3.0,
        key="readings/{{ ds }}",
    )

    @task.exactly_once(conn_id="warehouse", key="alerts/{{ ds }}")
    def alert(eos, ds=None):
        hot = eos.conn.execute(
            "SELECT device, seq, value FROM readings WHERE value > 10 ORDER BY seq"
        ).fetchall()
        for device, seq, value in hot:
            reading = {"device": device, "seq": seq, "value": value, "day": ds}
            eos.publish(f"nats:{SUBJECT}", reading, key=device)
            eos.publish(f"kafka:{ALERTS}", reading, key=device)
        return {"alerts": len(hot)}

    relay = OutboxRelayOperator(
        task_id="relay",
        conn_id="warehouse",
        kafka_conn_id="kafka",
        nats_conn_id="nats",
        destinations=["nats:*", "kafka:*"],
    )

    load_alerts = KafkaToPostgresOperator(
        task_id="load_alerts",
        kafka_conn_id="kafka",
        topics=[ALERTS],
        target_conn_id="warehouse",
        table="alerts_received",
        poll_timeout=3.0,
    )

    load >> alert() >> relay >> load_alerts

    # bad input: each fails at once (no retry) and writes nothing
    KafkaToPostgresOperator(
        task_id="missing_topic",
        kafka_conn_id="kafka",
        topics="no-such-topic",
        target_conn_id="warehouse",
        table="readings",
    )
    KafkaToPostgresOperator(
        task_id="unknown_kafka_connection",
        kafka_conn_id="no_such_kafka",
        topics=READINGS,
        target_conn_id="warehouse",
        table="readings",
    )
    OutboxRelayOperator(
        task_id="unknown_nats_connection", conn_id="warehouse", nats_conn_id="no_such_nats"
    )

    @task.exactly_once(conn_id="warehouse")
    def non_json_payload(eos):
        eos.publish(f"kafka:{ALERTS}", {"at": datetime(2024, 1, 1)})

    @task.exactly_once(conn_id="warehouse")
    def unknown_scheme(eos):
        eos.publish("sqs:alerts", {"ok": True})

    non_json_payload()
    unknown_scheme()


eos_messaging()
