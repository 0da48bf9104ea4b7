"""IoT readings from Kafka into PostgreSQL every hour, exactly once, with alerts via the outbox.

- ``load_readings`` (``KafkaToPostgresOperator``) reads the ``iot.readings`` partitions from
  the offsets kept in the warehouse's ledger. Its ``process`` inserts each reading (a JSON
  object such as ``{"device": "pump-7", "at": "2024-01-01T10:15:00Z", "celsius": 81.5}``)
  into ``iot_readings`` and, for each reading above ``THRESHOLD``, publishes an alert
  through the transactional outbox. Rows, alerts and offsets commit in one transaction: no
  reading is lost or loaded twice and no alert is raised twice or for a reading that was
  not stored, whatever crashes. (Alerting in the loading effect also covers late readings,
  which a separate "readings of the last hour" query would miss.)
- ``relay_alerts`` (``OutboxRelayOperator``) delivers the alerts to NATS JetStream (subject
  ``iot.alerts.<device>``, deduplicated by ``Nats-Msg-Id``) and to the Kafka topic
  ``iot.alerts`` (the ``eos-message-id`` header lets consumers drop re-sends).

Connections: ``eos_warehouse`` (PostgreSQL with the ledger: ``eos-airflow db migrate
--conn-id eos_warehouse``; tables from ``SETUP_SQL``), ``eos_kafka`` (type ``kafka``; extra
JSON ``{"bootstrap.servers": "broker:9092"}``) and ``eos_nats`` (host and port of a NATS
server with JetStream and a stream capturing ``iot.alerts.>``, e.g.
``nats stream add IOT_ALERTS --subjects 'iot.alerts.>' --dupe-window 10m``). Without a NATS
server, set the Airflow Variable ``eos_iot_alert_brokers`` to ``kafka`` (default
``nats,kafka``; read when the DAG is parsed): alerts then go to Kafka only.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Variable, dag

from eos_airflow import KafkaToPostgresOperator, OutboxRelayOperator

THRESHOLD = 80.0  # degrees Celsius
#: The brokers that receive the alerts ("nats", "kafka").
BROKERS = Variable.get("eos_iot_alert_brokers", default="nats,kafka").replace(" ", "").split(",")

SETUP_SQL = """
CREATE TABLE IF NOT EXISTS iot_readings (device text NOT NULL, at timestamptz NOT NULL,
                                         celsius float8 NOT NULL);
CREATE INDEX IF NOT EXISTS iot_readings_at_idx ON iot_readings (at);
"""


def load_and_alert(eos, messages):
    """Insert the batch's readings; publish an alert for each one above the threshold."""
    readings = [m.json() for m in messages]
    with eos.conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO iot_readings (device, at, celsius) VALUES (%s, %s, %s)",
            [(r["device"], r["at"], r["celsius"]) for r in readings],
        )
    alerts = 0
    for reading in readings:
        if reading["celsius"] > THRESHOLD:
            alert = {**reading, "threshold": THRESHOLD}
            if "nats" in BROKERS:
                eos.publish(f"nats:iot.alerts.{reading['device']}", alert, key=reading["device"])
            if "kafka" in BROKERS:
                eos.publish("kafka:iot.alerts", alert, key=reading["device"])
            alerts += 1
    return {"readings": len(readings), "alerts": alerts}


@dag(
    schedule="@hourly",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 3, "retry_delay": timedelta(seconds=30)},
    tags=["eos-airflow", "example", "kafka", "outbox"],
)
def eos_iot_readings():
    load_readings = KafkaToPostgresOperator(
        task_id="load_readings",
        kafka_conn_id="eos_kafka",
        topics=["iot.readings"],
        target_conn_id="eos_warehouse",
        process=load_and_alert,
        max_messages=200_000,
        poll_timeout=10.0,
    )
    relay_alerts = OutboxRelayOperator(
        task_id="relay_alerts",
        conn_id="eos_warehouse",
        kafka_conn_id="eos_kafka" if "kafka" in BROKERS else None,
        nats_conn_id="eos_nats" if "nats" in BROKERS else None,
        destinations=[d for d in ("nats:*", "kafka:iot.alerts") if d.split(":")[0] in BROKERS],
    )
    load_readings >> relay_alerts


eos_iot_readings()
