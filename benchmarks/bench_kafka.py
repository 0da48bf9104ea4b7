"""Kafka ingest and outbox relay throughput against bare clients, in the same process.

    python benchmarks/bench_kafka.py [--dsn DSN] [--messages 50000] [--batch 10000]
                                     [--relay-messages 20000] [--nats nats://127.0.0.1:4222]

K1  Kafka → PostgreSQL messages/s through ``KafkaToPostgresOperator``'s core
    (``ingest_batch`` inside ``Ledger.run``: partitions assigned from ``eos.offsets``, a
    bounded batch polled, rows inserted, offsets advanced, one effect per batch) divided by a
    bare consumer writing the same rows with the same INSERT, one transaction per batch,
    without the ledger (positions kept only in memory). Same topic, same batch size, runs
    alternate bare, eos, eos, bare; the mean of each side's two runs counts.
R1  outbox relay to NATS JetStream, messages/s (``Relay.drain``: lock rows, publish with
    ``Nats-Msg-Id`` and await acks, mark delivered) divided by publishing the same payloads
    with the same headers straight to JetStream (acks awaited, no database).

Kafka is librdkafka's mock cluster (in this process, over loopback TCP); NATS is the server
at --nats. The script creates a database ``eos_bench_<random>`` through the admin DSN
(--dsn, else $EOS_BENCH_DSN, $EOS_TEST_DSN, else postgresql://postgres@127.0.0.1/postgres),
migrates the ledger into it and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import confluent_kafka as ck  # noqa: E402
import psycopg  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402

from eos_airflow.api import Ledger  # noqa: E402
from eos_airflow.ledger.migrate import migrate  # noqa: E402
from eos_airflow.protocol.ingest import consumer_config, ingest_batch, table_writer  # noqa: E402
from eos_airflow.relay.loop import Relay  # noqa: E402
from eos_airflow.relay.sinks import NatsSink  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1/postgres"
PARTITIONS = 4
TABLE = "bench_readings"
INSERT = sql.SQL(
    "INSERT INTO {t} SELECT * FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb)"
).format(t=sql.Identifier(TABLE))


def produce(bootstrap: str, topic: str, n: int) -> None:
    producer = ck.Producer(
        {"bootstrap.servers": bootstrap, "log_level": 0, "linger.ms": 5, "enable.idempotence": True}
    )
    producer.list_topics(topic, timeout=10)
    for i in range(n):
        value = json.dumps({"device": f"d{i % 100}", "seq": i, "celsius": 20 + i % 70})
        while True:
            try:
                producer.produce(topic, value.encode(), partition=i % PARTITIONS)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def bare_ingest(dsn: str, bootstrap: str, topic: str, n: int, batch: int) -> float:
    """A plain consumer writing the same rows per batch, no ledger; returns seconds."""
    config = consumer_config({"bootstrap.servers": bootstrap, "log_level": 0})
    start = time.perf_counter()
    consumer = ck.Consumer(config)
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in partitions])
    done = 0
    with psycopg.connect(dsn) as conn:
        while done < n:
            rows: list[Any] = []
            while len(rows) < batch and done + len(rows) < n:
                for m in consumer.consume(min(batch - len(rows), 1000), timeout=0.1):
                    if m.error() is None:
                        rows.append(json.loads(m.value()))
            conn.execute(INSERT, [json.dumps(rows)])
            conn.commit()
            done += len(rows)
    consumer.close()
    return time.perf_counter() - start


def eos_ingest(ledger: Ledger, bootstrap: str, topic: str, n: int, batch: int, run: str) -> float:
    write = table_writer(TABLE)
    config = {"bootstrap.servers": bootstrap, "log_level": 0}
    start = time.perf_counter()
    done, i = 0, 0
    while done < n:
        result = ledger.run(
            f"bench/{run}/{i}",
            lambda eos: ingest_batch(
                eos, config, [topic], write=write, max_messages=batch, poll_timeout=2.0
            ),
        )
        done += result["messages"]
        i += 1
        if not result["messages"]:
            raise RuntimeError("ingest stalled")
    return time.perf_counter() - start


def bench_ingest(dsn: str, bootstrap: str, n: int, batch: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {"bare": [], "eos": []}
    with Ledger(dsn) as ledger:
        for side in ("bare", "eos", "eos", "bare"):
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            produce(bootstrap, topic, n)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(TABLE)))
            if side == "bare":
                seconds = bare_ingest(dsn, bootstrap, topic, n, batch)
            else:
                seconds = eos_ingest(ledger, bootstrap, topic, n, batch, topic)
            with psycopg.connect(dsn) as conn:
                (count,) = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE))
                ).fetchone()
            assert count == n, (side, count)
            rates[side].append(n / seconds)
            print(f"  K1 {side:4}: {n / seconds:10,.0f} messages/s", flush=True)
    bare = sum(rates["bare"]) / 2
    eos = sum(rates["eos"]) / 2
    return {"bare": bare, "eos": eos, "ratio": eos / bare}


def bench_relay(dsn: str, nats_url: str, n: int) -> dict[str, float]:
    import nats

    name = f"EOSBENCH_{secrets.token_hex(4).upper()}"
    subject = f"eosbench.{name.lower()}"

    async def admin(op: str) -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        if op == "add":
            await js.add_stream(name=name, subjects=[f"{subject}.>"], duplicate_window=120.0)
        else:
            await js.delete_stream(name)
        await nc.close()

    asyncio.run(admin("add"))
    try:
        with Ledger(dsn) as ledger:
            per_effect = 1000
            for e in range(n // per_effect):

                def publish(eos, e=e):
                    for i in range(per_effect):
                        eos.publish(
                            f"nats:{subject}.eos",
                            {"device": f"d{i % 100}", "seq": e * per_effect + i},
                        )

                ledger.run(f"relay-bench/{e}", publish)
        sink = NatsSink(nats_url)
        with psycopg.connect(dsn, autocommit=True) as conn:
            start = time.perf_counter()
            stats = Relay(conn, {"nats": sink}, batch_size=500).drain()
            eos_s = time.perf_counter() - start
        assert stats.total == n // per_effect * per_effect, stats
        # baseline: the same messages straight to JetStream, acks awaited in batches of 500
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                "SELECT message_id::text, payload FROM eos.outbox ORDER BY id"
            ).fetchall()

        async def bare() -> float:
            nc = await nats.connect(nats_url)
            js = nc.jetstream()
            t0 = time.perf_counter()
            for b in range(0, len(rows), 500):
                await asyncio.gather(
                    *(
                        js.publish(
                            f"{subject}.bare",
                            json.dumps(p, separators=(",", ":")).encode(),
                            headers={"Nats-Msg-Id": f"bare-{mid}"},
                        )
                        for mid, p in rows[b : b + 500]
                    )
                )
            seconds = time.perf_counter() - t0
            await nc.close()
            return seconds

        bare_s = asyncio.run(bare())
        sink.close()
    finally:
        asyncio.run(admin("delete"))
    count = stats.total
    return {"bare": count / bare_s, "eos": count / eos_s, "ratio": bare_s / eos_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dsn", help=f"admin DSN (default $EOS_BENCH_DSN, $EOS_TEST_DSN or {DEFAULT_DSN})"
    )
    ap.add_argument("--messages", type=int, default=50_000, help="K1 messages per run")
    ap.add_argument("--batch", type=int, default=10_000, help="K1 messages per batch/effect")
    ap.add_argument("--relay-messages", type=int, default=20_000, help="R1 messages")
    ap.add_argument("--nats", default=os.environ.get("EOS_TEST_NATS_URL", "nats://127.0.0.1:4222"))
    args = ap.parse_args(argv)
    admin = (
        args.dsn or os.environ.get("EOS_BENCH_DSN") or os.environ.get("EOS_TEST_DSN") or DEFAULT_DSN
    )
    dbname = f"eos_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        version = conn.info.server_version
    dsn = conninfo.make_conninfo(admin, dbname=dbname)
    owner = ck.Producer({"test.mock.num.brokers": 1, "log_level": 0})
    bootstrap = ",".join(
        f"{b.host}:{b.port}" for b in owner.list_topics(timeout=10).brokers.values()
    )
    try:
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE TABLE {} (device text, seq int, celsius float8)").format(
                    sql.Identifier(TABLE)
                )
            )
        print(
            f"PostgreSQL {version // 10000}.{version % 10000}, confluent-kafka "
            f"{ck.__version__} (librdkafka {ck.libversion()[0]}, mock cluster), "
            f"{args.messages:,} messages per K1 run, batch {args.batch:,}",
            flush=True,
        )
        k1 = bench_ingest(dsn, bootstrap, args.messages, args.batch)
        r1 = bench_relay(dsn, args.nats, args.relay_messages)
    finally:
        del owner
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
    print()
    print("| metric | baseline | eos-airflow | ratio |")
    print("|---|---|---|---|")
    print(
        f"| K1 Kafka → PostgreSQL, messages/s | {k1['bare']:,.0f} (bare consumer) | "
        f"{k1['eos']:,.0f} | **{k1['ratio']:.2f}** |"
    )
    print(
        f"| R1 outbox → NATS JetStream, messages/s | {r1['bare']:,.0f} (direct publish) | "
        f"{r1['eos']:,.0f} | **{r1['ratio']:.2f}** |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
