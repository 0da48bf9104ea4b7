"""``eos.publish`` and the outbox relay against real PostgreSQL, NATS JetStream and Kafka."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import psycopg
import pytest

from eos_airflow import Ledger
from eos_airflow.errors import ConfigurationError, FailpointError, LedgerSchemaError
from eos_airflow.failpoints import EXIT_CODE
from eos_airflow.protocol.messages import KAFKA_MSG_ID_HEADER, NATS_MSG_ID_HEADER
from eos_airflow.relay import (
    DeliveryError,
    KafkaSink,
    MessageError,
    NatsSink,
    Relay,
    relay_forever,
)
from tests.conftest import ROOT, events
from tests.messaging.conftest import NATS_URL, consume_all, nats_received


def outbox(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT effect_key, seq, message_id::text, destination, "
            "message_key, payload, delivered_at IS NOT NULL "
            "FROM eos.outbox ORDER BY id"
        ).fetchall()


def publish_alerts(
    ledger: Ledger, key: str, destination: str, n: int, *, fail_first: bool = False
) -> list[str]:
    ids: list[str] = []

    def fn(eos):
        ids.clear()
        for i in range(n):
            ids.append(
                eos.publish(
                    destination,
                    {"alert": i, "key": key},
                    key=f"dev-{i}",
                    headers={"origin": "test"},
                )
            )
        if fail_first and eos.attempt == 1:
            raise RuntimeError("sensor feed cut")
        return {"published": len(ids)}

    try:
        ledger.run(key, fn)
    except RuntimeError:
        ledger.run(key, fn, attempt=2)
    return ids


def test_publish_commits_with_the_effect_and_a_retry_reuses_the_ids(ledger, db):
    first: list[str] = []

    def fn(eos):
        first.append(eos.publish("kafka:alerts", {"n": 1}))
        first.append(eos.publish("nats:alerts.high", [1, 2], key="k"))
        if eos.attempt == 1:
            raise RuntimeError("crash after publishing")
        return {"ok": True}

    with pytest.raises(RuntimeError):
        ledger.run("alerts/1", fn)
    assert outbox(db) == []  # rolled back with the effect
    ids_try1 = list(first)
    first.clear()
    ledger.run("alerts/1", fn, attempt=2)
    assert first == ids_try1  # same message ids on the retry
    ledger.run("alerts/1", fn, attempt=3)  # committed: skipped, nothing published again
    rows = outbox(db)
    assert [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
        ("alerts/1", 1, ids_try1[0], "kafka:alerts", None, {"n": 1}),
        ("alerts/1", 2, ids_try1[1], "nats:alerts.high", "k", [1, 2]),
    ]
    with psycopg.connect(db) as conn:
        assert [e for e, _ in events(conn, "alerts/1")] == [
            "claimed",
            "failed",
            "claimed",
            "committed",
            "skipped",
        ]


def test_replace_publishes_new_messages_under_new_ids(ledger, db):
    def fn(eos):
        eos.publish("kafka:alerts", {"version": eos.previous.version if eos.previous else 0})
        return {}

    ledger.run("alerts/r", fn)
    ledger.run("alerts/r", fn, on_committed="replace")
    rows = outbox(db)
    assert [r[5] for r in rows] == [{"version": 0}, {"version": 1}]
    assert rows[0][2] != rows[1][2]


BAD_MESSAGES = [
    (
        lambda eos: eos.publish("kafka:alerts", {"at": object()}),
        "message to 'kafka:alerts': the payload must be JSON (dict, list, str, int, float, bool "
        "or None), got dict: Object of type object is not JSON serializable; convert it first",
    ),
    (lambda eos: eos.publish("kafka:alerts", float("nan")), "the payload must be JSON"),
    (
        lambda eos: eos.publish("smtp:ops@example.com", {}),
        "destination 'smtp:ops@example.com' has unknown scheme 'smtp'; known schemes: nats, kafka",
    ),
    (lambda eos: eos.publish("alerts", {}), "destination 'alerts' is not 'scheme:name'"),
    (lambda eos: eos.publish("kafka:bad topic", {}), "'bad topic' is not a Kafka topic name"),
    (lambda eos: eos.publish("nats:alerts.*", {}), "is not a NATS subject to publish to"),
    (
        lambda eos: eos.publish("nats:a", {}, headers={"Nats-Msg-Id": "x"}),
        "header 'Nats-Msg-Id' is set by the relay",
    ),
    (lambda eos: eos.publish("nats:a", {}, key=7), "key must be a string or None, got int"),
]


def test_bad_messages_fail_clearly_and_write_nothing(ledger, db):
    for i, (call, message) in enumerate(BAD_MESSAGES):

        def fn(eos, call=call):
            eos.publish("kafka:alerts", {"good": True})  # rolled back with the effect
            call(eos)

        with pytest.raises(MessageError) as caught:
            ledger.run(f"bad/{i}", fn)
        assert message in str(caught.value)
        with psycopg.connect(db) as conn:
            assert events(conn, f"bad/{i}") == [("claimed", 1), ("failed", 1)]
    assert outbox(db) == []


def test_relay_needs_a_sink_for_each_destination(conn):
    with pytest.raises(
        ConfigurationError, match="include scheme.s. kafka but the relay has no sink for them"
    ):
        Relay(conn, {}, destinations=["kafka:*"])
    with pytest.raises(
        ConfigurationError, match="include scheme.s. kafka but the relay has no sink for them"
    ):
        Relay(conn, {}, destinations=["kafka:alerts"])
    with pytest.raises(MessageError, match="unknown scheme 'mqtt'"):
        Relay(conn, {}, destinations=["mqtt:*"])


def test_relay_takes_exact_destinations_that_its_sinks_serve(conn, kafka_bootstrap):
    sink = make_sink("kafka", kafka_bootstrap)
    try:
        relay = Relay(conn, {"kafka": sink}, destinations=["kafka:alerts"])
        assert (relay.exact, relay.schemes) == (["kafka:alerts"], [])
    finally:
        sink.close()


def test_missing_stream_is_a_clear_delivery_error_and_nothing_is_marked(ledger, db, conn):
    publish_alerts(ledger, "nostream/1", "nats:eostest.nostream.x", 1)
    sink = NatsSink(NATS_URL, timeout=5)
    try:
        with pytest.raises(
            Exception, match="no JetStream stream stores subject.s. eostest.nostream.x; create one"
        ):
            Relay(conn, {"nats": sink}).drain()
    finally:
        sink.close()
    assert [r[6] for r in outbox(db)] == [False]


# -- crash at every relay step, then relay again: each message arrives once ------------------

RELAY_STEPS = ("after_send", "before_commit", "after_commit")

CHILD = """
import json, os, psycopg
from eos_airflow.relay import KafkaSink, NatsSink, Relay
spec = json.loads(os.environ["RELAY_SPEC"])
sink = (NatsSink(spec["nats"]) if spec["scheme"] == "nats"
        else KafkaSink({"bootstrap.servers": spec["kafka"]}, transactional_id="eos-outbox-t"))
with psycopg.connect(spec["dsn"], autocommit=True) as conn:
    Relay(conn, {spec["scheme"]: sink}, relay_id="child", batch_size=4).drain()
"""


def relay_in_child(dsn: str, scheme: str, step: str, kafka: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "EOS_FAILPOINTS": f"{step}=exit",
        "PYTHONPATH": str(ROOT),
        "RELAY_SPEC": json.dumps({"dsn": dsn, "scheme": scheme, "nats": NATS_URL, "kafka": kafka}),
    }
    return subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )


def make_sink(scheme: str, kafka_bootstrap: str):
    if scheme == "nats":
        return NatsSink(NATS_URL, timeout=10)
    return KafkaSink(
        {"bootstrap.servers": kafka_bootstrap, "log_level": 0}, transactional_id="eos-outbox-t"
    )


@pytest.mark.parametrize("action", ["raise", "exit"])
@pytest.mark.parametrize("step", RELAY_STEPS)
@pytest.mark.parametrize("scheme", ["nats", "kafka"])
def test_relay_crash_at_every_step_then_each_message_is_received_once(
    ledger, db, conn, nats_stream, kafka_topic, kafka_bootstrap, monkeypatch, scheme, step, action
):
    stream, prefix = nats_stream
    name = f"{prefix}.alerts" if scheme == "nats" else kafka_topic
    ids = publish_alerts(ledger, "alerts/a", f"{scheme}:{name}", 6, fail_first=True)
    ids += publish_alerts(ledger, "alerts/b", f"{scheme}:{name}", 3)

    if action == "exit":
        crashed = relay_in_child(db, scheme, step, kafka_bootstrap)
        assert crashed.returncode == EXIT_CODE, crashed.stderr[-3000:]
        assert f"failpoint {step} exits the process" in crashed.stderr
    else:
        monkeypatch.setenv("EOS_FAILPOINTS", f"{step}=raise")
        sink = make_sink(scheme, kafka_bootstrap)
        with pytest.raises(FailpointError):
            Relay(conn, {scheme: sink}, relay_id="t", batch_size=4).drain()
        sink.close()
        monkeypatch.delenv("EOS_FAILPOINTS")
    delivered_before = sum(r[6] for r in outbox(db))
    assert delivered_before == (4 if step == "after_commit" else 0)

    sink = make_sink(scheme, kafka_bootstrap)
    try:
        stats = Relay(conn, {scheme: sink}, relay_id="t", batch_size=4).drain()
    finally:
        sink.close()
    assert stats.total == 9 - delivered_before
    assert all(r[6] for r in outbox(db))

    if scheme == "nats":
        got = nats_received(stream, f"{prefix}.>")
        assert [h[NATS_MSG_ID_HEADER] for _, _, h in got] == ids  # once each, in order
        assert got[0][1] == {"alert": 0, "key": "alerts/a"} and got[0][2]["origin"] == "test"
        assert stats.duplicates == (4 if step != "after_commit" else 0)
    else:
        got = consume_all(kafka_bootstrap, kafka_topic)
        received = [dict(m.headers())[KAFKA_MSG_ID_HEADER].decode() for m in got]
        # Kafka keeps a re-sent copy when the crash came after the producer committed
        # (after_send, before_commit); consumers drop it by id (test_kafka_ingest.py)
        resent = ids[:4] if step in ("after_send", "before_commit") else []
        assert Counter(received) == Counter(ids + resent)


def test_relay_on_a_database_without_the_ledger_says_to_migrate(empty_db):
    sink = NatsSink(NATS_URL, timeout=5)
    try:
        with (
            psycopg.connect(empty_db, autocommit=True) as conn,
            pytest.raises(
                LedgerSchemaError,
                match=r'the ledger schema "eos" in database "eos_e_\w+" has '
                "no outbox .*; upgrade it with `eos-airflow db migrate`",
            ),
        ):
            Relay(conn, {"nats": sink}).drain()
    finally:
        sink.close()


def test_relay_forever_delivers_what_effects_publish_until_stopped(ledger, db, nats_stream):
    stream, prefix = nats_stream
    stop = threading.Event()
    sink = NatsSink(NATS_URL, timeout=5)
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(
            relay_forever(
                lambda: psycopg.connect(db, autocommit=True),
                {"nats": sink},
                poll_interval=0.05,
                stop=stop,
            )
        )
    )
    worker.start()
    try:
        ids = publish_alerts(ledger, "live/1", f"nats:{prefix}.live", 3)
        deadline = time.monotonic() + 10
        while not all(r[6] for r in outbox(db)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(10)
        sink.close()
    assert result[0].total == 3
    assert [h[NATS_MSG_ID_HEADER] for _, _, h in nats_received(stream, f"{prefix}.>")] == ids


def test_unreachable_nats_is_a_retryable_error_without_the_password():
    with pytest.raises(DeliveryError) as caught:
        NatsSink("nats://relay:s3cret@127.0.0.1:1", timeout=2)
    assert str(caught.value).startswith("cannot connect to NATS at nats://relay:***@127.0.0.1:1: ")
    assert "s3cret" not in str(caught.value) and caught.value.retryable
