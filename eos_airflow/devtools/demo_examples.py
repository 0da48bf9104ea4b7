"""Faces tier: the three example uses of ``eos-airflow demo``, each through real Airflow under a
failure.

- analytics (``dags/eos_analytics_daily.py``): a source database with one day of orders and
  120,000 order events; the chunked, staged ``events_history`` load fails after its second
  chunk and Airflow's retry resumes after the last committed chunk; then late orders arrive
  and the day runs again, as a backfill or a cleared run does: the day is replaced, not
  added twice.
- IoT (``dags/eos_iot_readings.py``): this process starts librdkafka's mock Kafka cluster
  (it lives as long as the client that created it, so for the whole example) and produces
  readings; Airflow reaches it through the ``eos_kafka`` connection. The ingest fails after
  polling (try 1) and after its commit (try 2); the relay then delivers the alerts to Kafka
  and, when a NATS JetStream server answers on ``EOS_DEMO_NATS_URL``, to NATS (a stream of
  the demo's own, deleted at the end); otherwise the DAG's Variable
  ``eos_iot_alert_brokers`` is ``kafka`` and the alerts go to Kafka only.
- finance (``dags/eos_bank_transfer.py``): two bank databases, a two-phase-commit transfer
  whose worker is killed right after the commit decision (both prepared transactions left
  in doubt); ``eos-airflow recover`` finishes them and a re-run of the day moves nothing
  twice. Needs ``max_prepared_transactions`` > 0 (the embedded server sets it).

Each example checks what a user would check (rows against the source, broker contents,
balances, prepared transactions, ledger events) and returns one row of the summary table.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from eos_airflow.failpoints import EXIT_CODE
from eos_airflow.ledger.migrate import migrate

console = Console()
DAGS = Path(__file__).resolve().parent / "dags"
SOURCE_DB, BANK_DBS = "eos_demo_source", {"a": "eos_demo_bank_a", "b": "eos_demo_bank_b"}
#: Example data sizes: the events load commits every 50,000 rows (``chunk_rows``).
ORDERS, EVENTS, LATE_ORDERS, READINGS = 2_000, 120_000, 25, 600
NATS_STREAM = "EOS_DEMO_IOT_ALERTS"

Runner = Callable[..., int]


@dataclass
class Outcome:
    """One example's row of the summary: what happened, what the ledger prevented, checks."""

    example: str
    happened: str = ""
    prevented: str = ""
    failures: list[str] = field(default_factory=list)

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append(what)


def _outcome(code: int) -> str:
    return {0: "run succeeded", EXIT_CODE: f"process killed (exit {EXIT_CODE})"}.get(
        code, f"run failed (exit {code})"
    )


def _step(label: str, code: int) -> None:
    console.print(f"  {label:<52} {_outcome(code)}")


def _setup_sql(dag_file: str) -> str:
    # read as text: importing the DAG file would import Airflow
    source = (DAGS / dag_file).read_text()
    return source.split('SETUP_SQL = """', 1)[1].split('"""', 1)[0]


def _fresh_database(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)


def _one(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchone()


def _all(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def _events(dsn: str, key: str) -> list[str]:
    return [
        e
        for (e,) in _all(
            dsn, "SELECT event::text FROM eos.ledger_events WHERE key = %s ORDER BY seq", [key]
        )
    ]


# ----------------------------------------------------------------------------- analytics


def analytics(admin_dsn: str, warehouse: str, env: dict[str, str], run: Runner) -> Outcome:
    from eos_airflow.hooks.ledger import airflow_conn_json

    out = Outcome("analytics  eos_analytics_daily")
    console.print(
        "\n[bold cyan]▶ analytics[/bold cyan] — a chunked, staged load of one day "
        f"({EVENTS:,} events, chunks of 50,000) fails after chunk 2; then the day "
        "runs again with late orders (as a backfill does)"
    )
    source = _fresh_database(admin_dsn, SOURCE_DB)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, created_at timestamptz, "
            "customer_id bigint, amount numeric(12, 2))"
        )
        conn.execute(
            "CREATE TABLE order_events (id bigint PRIMARY KEY, at timestamptz, "
            "order_id bigint, kind text)"
        )
        conn.execute(
            "INSERT INTO orders SELECT g, '2024-01-01'::timestamptz + g * interval "
            "'40 s', g %% 97, (g %% 500) + 0.99 FROM generate_series(1, %s) g",
            [ORDERS],
        )
        conn.execute(
            "INSERT INTO order_events SELECT g, '2024-01-01'::timestamptz + g * "
            "interval '0.7 s', g %% %s + 1, (ARRAY['placed', 'paid', 'shipped'])[g %% 3 "
            "+ 1] FROM generate_series(1, %s) g",
            [ORDERS, EVENTS],
        )
    with psycopg.connect(warehouse, autocommit=True) as conn:
        conn.execute(_setup_sql("eos_analytics_daily.py"))
    env["AIRFLOW_CONN_EOS_SOURCE"] = airflow_conn_json(source)

    key = "analytics/order_events/2024-01-01"
    code = run(
        "dags", "test", "eos_analytics_daily", "2024-01-01", failpoints="after_chunk@1#2=raise"
    )
    _step("run of 2024-01-01, events load fails after chunk 2", code)
    out.check(code == 0, "the first run of eos_analytics_daily failed")
    resumed = _all(
        warehouse,
        "SELECT (detail->>'rows')::bigint FROM eos.ledger_events "
        "WHERE key = %s AND event = 'resumed'",
        [key],
    )
    loaded = _one(
        warehouse,
        "SELECT count(*), count(DISTINCT event_id) FROM analytics.order_events "
        "WHERE day = '2024-01-01'",
    )
    out.check(
        loaded == (EVENTS, EVENTS),
        f"events after the resumed load: {loaded}, expected {EVENTS} distinct",
    )
    out.check(len(resumed) == 1, f"expected one 'resumed' event for {key}, got {resumed}")
    skipped_rows = resumed[0][0] if resumed else 0
    console.print(
        f"    try 2 resumed after {skipped_rows:,} committed rows; "
        f"{loaded[0]:,} events in the warehouse ({EVENTS:,} in the source)"
    )

    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO orders SELECT g, '2024-01-01 23:00'::timestamptz, 1, 10 "
            "FROM generate_series(%s::int, %s::int) g",
            [ORDERS + 1, ORDERS + LATE_ORDERS],
        )
    code = run("dags", "test", "eos_analytics_daily", "2024-01-01")
    _step(f"re-run of 2024-01-01 after {LATE_ORDERS} late orders", code)
    out.check(code == 0, "the re-run of eos_analytics_daily failed")
    orders = _one(
        warehouse, "SELECT count(*) FROM analytics.orders_daily WHERE day = '2024-01-01'"
    )[0]
    events = _one(
        warehouse, "SELECT count(*) FROM analytics.order_events WHERE day = '2024-01-01'"
    )[0]
    revenue = _one(warehouse, "SELECT orders FROM analytics.revenue_daily WHERE day = '2024-01-01'")
    versions = dict(
        _all(warehouse, "SELECT key, version FROM eos.ledger WHERE key LIKE 'analytics/%'")
    )
    expected = ORDERS + LATE_ORDERS
    out.check(orders == expected, f"orders of the day: {orders}, expected {expected}")
    out.check(events == EVENTS, f"events of the day after the re-run: {events}, expected {EVENTS}")
    out.check(revenue == (expected,), f"revenue_daily counts {revenue}, expected {expected}")
    replaced = sum(_events(warehouse, k).count("replaced") for k in versions)
    out.check(
        replaced == 3, f"expected the 3 effects of the day replaced once each, got {replaced}"
    )
    console.print(
        f"    the day was replaced (ledger version {max(versions.values(), default=0)}): "
        f"{orders:,} orders, {events:,} events — not {orders + ORDERS:,} / "
        f"{2 * EVENTS:,}"
    )
    out.happened = (
        f"load failed after chunk 2; retry resumed after {skipped_rows:,} rows; "
        "re-run of the day replaced it"
    )
    out.prevented = (
        f"{skipped_rows:,} rows copied again; the re-run adding {ORDERS:,} orders "
        f"and {EVENTS:,} events a second time"
    )
    return out


# ----------------------------------------------------------------------------------- IoT


def _nats_url() -> tuple[str | None, str]:
    """(the NATS URL to use or None, why not)."""
    url = os.environ.get("EOS_DEMO_NATS_URL", "nats://127.0.0.1:4222")
    if not url:
        return None, "EOS_DEMO_NATS_URL is empty"
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), 1):
            return url, ""
    except OSError:
        return None, f"no NATS server answers at {url}"


def _nats(url: str, action: str) -> int:
    """``create`` (or re-create) the demo's stream capturing ``iot.alerts.>`` and return 0,
    ``count`` its messages, or ``delete`` it."""
    import nats

    async def go() -> int:
        nc = await nats.connect(url, connect_timeout=3, allow_reconnect=False)
        try:
            js = nc.jetstream()
            if action == "count":
                return (await js.stream_info(NATS_STREAM)).state.messages
            try:
                await js.delete_stream(NATS_STREAM)
            except nats.js.errors.NotFoundError:
                pass
            if action == "create":
                await js.add_stream(
                    name=NATS_STREAM, subjects=["iot.alerts.>"], duplicate_window=600.0
                )
            return 0
        finally:
            await nc.close()

    return asyncio.run(go())


def _kafka_messages(bootstrap: str, topic: str) -> list[Any]:
    """Every committed message of ``topic`` (a read_committed consumer from the start)."""
    import confluent_kafka

    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"eos-demo-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,
            "log_level": 0,
        }
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign(
            [
                confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in parts
            ]
        )
        out: list[Any] = []
        ends: set[int] = set()
        for _ in range(600):  # at most a minute
            if len(ends) == len(parts):
                break
            for message in consumer.consume(1000, timeout=0.1):
                error, partition = message.error(), message.partition()
                if error is None:
                    out.append(message)
                    ends.discard(partition)
                elif error.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    assert partition is not None  # an end-of-partition event names its partition
                    ends.add(partition)
        return out
    finally:
        consumer.close()


def readings() -> list[dict[str, Any]]:
    """The readings the demo produces: six pumps, one every 6 s, some above 80 °C."""
    return [
        {
            "device": f"pump-{i % 6}",
            "at": f"2024-01-01T10:{i // 10:02d}:{i % 10 * 6:02d}Z",
            "celsius": round(60.0 + (i * 7919 % 250) / 10, 1),
        }
        for i in range(READINGS)
    ]


def iot(warehouse: str, env: dict[str, str], run: Runner) -> Outcome:
    out = Outcome("IoT        eos_iot_readings")
    try:
        import confluent_kafka
    except ImportError:
        console.print(
            "\n[yellow]▶ IoT skipped[/yellow]: confluent-kafka is not installed "
            "(pip install 'eos-airflow[kafka]')"
        )
        out.happened = "skipped: confluent-kafka is not installed"
        return out
    nats_url, why_not = _nats_url()
    if nats_url:
        try:
            _nats(nats_url, "create")
        except Exception as exc:  # no JetStream, no nats-py, a stream owning the subjects…
            nats_url, why_not = None, f"NATS at {nats_url} is not usable ({exc})"
    brokers = "NATS JetStream and Kafka" if nats_url else f"Kafka only ({why_not})"
    console.print(
        "\n[bold cyan]▶ IoT[/bold cyan] — Kafka readings into PostgreSQL with alerts "
        f"through the outbox to {brokers}; the ingest fails after polling (try 1) "
        "and after its commit (try 2)"
    )
    data = readings()
    hot = [r for r in data if r["celsius"] > 80.0]
    # the mock cluster lives as long as `owner`: keep it referenced until the checks are done
    owner = confluent_kafka.Producer({"test.mock.num.brokers": 1, "log_level": 0})
    try:
        found = owner.list_topics(timeout=10).brokers.values()
        bootstrap = ",".join(f"{b.host}:{b.port}" for b in found)
        producer = confluent_kafka.Producer(
            {"bootstrap.servers": bootstrap, "log_level": 0, "enable.idempotence": True}
        )
        for topic in ("iot.readings", "iot.alerts"):  # the mock cluster creates topics asked about
            producer.list_topics(topic, timeout=10)
        for reading in data:
            producer.produce(
                "iot.readings", json.dumps(reading).encode(), key=reading["device"].encode()
            )
        if producer.flush(15) != 0:
            raise RuntimeError("the mock Kafka cluster did not take the readings")
        console.print(
            f"    produced {len(data)} readings to iot.readings on the mock Kafka "
            f"cluster at {bootstrap} ({len(hot)} above 80 °C)"
        )
        with psycopg.connect(warehouse, autocommit=True) as conn:
            conn.execute(_setup_sql("eos_iot_readings.py"))
        env["AIRFLOW_CONN_EOS_KAFKA"] = json.dumps(
            {
                "conn_type": "kafka",
                "extra": json.dumps({"bootstrap.servers": bootstrap, "log_level": 0}),
            }
        )
        env["AIRFLOW_VAR_EOS_IOT_ALERT_BROKERS"] = "nats,kafka" if nats_url else "kafka"
        if nats_url:
            env["AIRFLOW_CONN_EOS_NATS"] = json.dumps(
                {"conn_type": "generic", "extra": json.dumps({"servers": [nats_url]})}
            )
        code = run(
            "dags",
            "test",
            "eos_iot_readings",
            "2024-01-01T10:00:00+00:00",
            failpoints="after_poll@1=raise,after_commit@2=raise",
        )
        _step("hourly run, ingest fails after poll and after commit", code)
        out.check(code == 0, "the run of eos_iot_readings failed")

        rows = _all(
            warehouse,
            "SELECT device, to_char(at AT TIME ZONE 'UTC', "
            '\'YYYY-MM-DD"T"HH24:MI:SS"Z"\'), celsius FROM iot_readings',
        )
        exact = sorted(rows) == sorted((r["device"], r["at"], r["celsius"]) for r in data)
        out.check(
            exact,
            f"iot_readings holds {len(rows)} rows that are not exactly the "
            f"{len(data)} produced readings",
        )
        load = _one(warehouse, "SELECT key FROM eos.ledger WHERE task_id = 'load_readings'")
        kinds = _events(warehouse, load[0]) if load else []
        out.check(
            kinds.count("committed") == 1 and "skipped" in kinds, f"load_readings events: {kinds}"
        )
        outbox = _all(
            warehouse,
            "SELECT split_part(destination, ':', 1), count(*), "
            "count(delivered_at) FROM eos.outbox GROUP BY 1 ORDER BY 1",
        )
        kafka = _kafka_messages(bootstrap, "iot.alerts")
        ids = {dict(m.headers() or []).get("eos-message-id") for m in kafka}
        out.check(
            len(kafka) == len(hot) == len(ids),
            f"Kafka iot.alerts holds {len(kafka)} alerts ({len(ids)} distinct), "
            f"expected {len(hot)}",
        )
        delivered = [f"Kafka {len(kafka)}"]
        if nats_url:
            in_stream = _nats(nats_url, "count")
            out.check(
                in_stream == len(hot), f"NATS stream holds {in_stream} alerts, expected {len(hot)}"
            )
            delivered.insert(0, f"NATS {in_stream}")
        out.check(
            all(n == d == len(hot) for _, n, d in outbox),
            f"outbox (destination, published, delivered): {outbox}, expected {len(hot)}",
        )
        console.print(
            f"    {len(rows)} rows = the {len(data)} produced readings; ledger: "
            f"{' → '.join(kinds)}; alerts delivered once each: "
            f"{', '.join(delivered)} of {len(hot)}"
        )
    finally:
        owner.flush(1)
        del owner
        if nats_url:
            try:
                _nats(nats_url, "delete")
            except Exception:  # noqa: S110 - best effort: the stream is the demo's own
                pass
    out.happened = (
        f"ingest failed after poll, then after commit; {len(rows)} readings, "
        f"{len(hot)} alerts to {' and '.join(d.split()[0] for d in delivered)}"
    )
    out.prevented = (
        "the retry loading the batch again (and its alerts); "
        "alerts for readings that were not stored"
    )
    return out


# ------------------------------------------------------------------------------- finance


def finance(admin_dsn: str, env: dict[str, str], run: Runner) -> Outcome:
    from eos_airflow.hooks.ledger import airflow_conn_json

    out = Outcome("finance    eos_bank_transfer")
    if not (DAGS / "eos_bank_transfer.py").exists():
        console.print("\n[yellow]▶ finance skipped[/yellow]: dags/eos_bank_transfer.py is missing")
        out.happened = "skipped: dags/eos_bank_transfer.py is missing"
        return out
    prepared = int(_one(admin_dsn, "SHOW max_prepared_transactions")[0])
    if prepared == 0:
        console.print(
            "\n[yellow]▶ finance skipped[/yellow]: two-phase commit needs "
            "max_prepared_transactions > 0 on this server (set it and restart it)"
        )
        out.happened = "skipped: max_prepared_transactions is 0"
        return out
    console.print(
        "\n[bold cyan]▶ finance[/bold cyan] — a transfer between two bank databases "
        "(two-phase commit); the worker is killed right after the commit decision"
    )
    banks = {name: _fresh_database(admin_dsn, db) for name, db in BANK_DBS.items()}
    for name, dsn in banks.items():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(_setup_sql("eos_bank_transfer.py"))
        migrate(dsn)
        env[f"AIRFLOW_CONN_BANK_{name.upper()}"] = airflow_conn_json(dsn)

    def state() -> tuple[list[Any], int]:
        balances = [
            _one(dsn, "SELECT coalesce(sum(balance), 0) FROM accounts")[0] for dsn in banks.values()
        ]
        in_doubt = sum(
            _one(dsn, "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()")[
                0
            ]
            for dsn in banks.values()
        )
        return balances, in_doubt

    opening = sum(state()[0])
    code = run(
        "dags", "test", "eos_bank_transfer", "2024-01-01", failpoints="after_decision@1=exit"
    )
    _step("transfer of 2024-01-01, killed after the decision", code)
    out.check(code == EXIT_CODE, f"the killed run exited with {code}, not {EXIT_CODE}")
    balances, in_doubt = state()
    console.print(
        f"    left in doubt: {in_doubt} prepared transactions (balances still "
        f"{' / '.join(str(b) for b in balances)}: the commit is decided, not done)"
    )
    out.check(in_doubt == 2, f"expected 2 prepared transactions after the crash, got {in_doubt}")

    recover = subprocess.run(
        [
            sys.executable,
            "-m",
            "eos_airflow.cli.main",
            "recover",
            "--conn-id",
            "bank_a",
            "--grace",
            "0s",
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outcomes = []
    if recover.returncode == 0:
        outcomes = [t["outcome"] for t in json.loads(recover.stdout).get("transactions", [])]
    _step("eos-airflow recover --conn-id bank_a", recover.returncode)
    out.check(
        outcomes == ["committed"],
        f"recover finished {outcomes}, expected ['committed']{recover.stderr[-300:]}",
    )
    code = run("dags", "test", "eos_bank_transfer", "2024-01-01")
    _step("re-run of 2024-01-01 (transfer, settle, check_total)", code)
    out.check(code == 0, "the re-run of eos_bank_transfer failed (check_total?)")
    balances, in_doubt = state()
    kinds = _events(banks["a"], "bank_transfer/2024-01-01")
    amount = opening // 2 - balances[0]
    out.check(sum(balances) == opening, f"total balance {sum(balances)}, expected {opening}")
    out.check(in_doubt == 0, f"{in_doubt} prepared transactions left")
    out.check(
        kinds.count("committed") == 1 and "skipped" in kinds, f"bank_transfer events: {kinds}"
    )
    console.print(
        f"    balances {' / '.join(str(b) for b in balances)}: moved {amount} once, "
        f"total {sum(balances)} unchanged, {in_doubt} prepared transactions left; "
        f"ledger: {' → '.join(kinds)}"
    )
    out.happened = (
        f"killed after the decision; recover committed both banks; "
        f"re-run moved nothing (total {sum(balances)})"
    )
    out.prevented = (
        "the transfer done twice or in one bank only; locks held by prepared transactions forever"
    )
    return out


# ----------------------------------------------------------------------------- lakehouse

LAKE_ORDERS = 2_000


def lakehouse(warehouse: str, env: dict[str, str], run: Runner, lake: Path) -> Outcome:
    from deltalake import DeltaTable
    from pyiceberg.catalog.sql import SqlCatalog

    from eos_airflow.hooks.ledger import sqlalchemy_url

    out = Outcome("lakehouse  eos_lakehouse_daily")
    console.print(
        "\n[bold cyan]▶ lakehouse[/bold cyan] — a day of orders into an Iceberg and a Delta "
        "table (local files); both loads crash mid-load (Iceberg before its commit, Delta "
        "right after Delta's commit), then the day is run again"
    )
    with psycopg.connect(warehouse, autocommit=True) as conn:
        conn.execute(_setup_sql("eos_lakehouse_daily.py"))
        conn.execute(
            "INSERT INTO orders SELECT g, 'c' || g %% 50, (g %% 300) + 0.5, "
            "'2024-01-01'::timestamptz + g * interval '40 s', "
            "('2024-01-01'::timestamptz + g * interval '40 s')::date, "
            "jsonb_build_object('channel', (ARRAY['web', 'shop'])[g %% 2 + 1]) "
            "FROM generate_series(1, %s) g",
            [LAKE_ORDERS],
        )
    day = "2024-01-01"
    expected = _one(warehouse, "SELECT count(*) FROM orders WHERE order_date = %s", [day])[0]
    lake.mkdir(parents=True, exist_ok=True)
    env["EOS_LAKE"] = lake.resolve().as_uri()
    delta_uri = f"{env['EOS_LAKE']}/delta/orders"

    def state() -> tuple[int, int, int, int]:
        catalog = SqlCatalog("eos", uri=sqlalchemy_url(warehouse))  # also a socket host
        table = catalog.load_table("lake.orders")
        delta = DeltaTable(delta_uri)
        writes = sum(  # data writes (version 0 created the table, empty)
            1 for h in delta.history() if h.get("operation") == "WRITE" and h.get("version", 0)
        )
        rows = table.scan(row_filter=f"order_date = '{day}'").to_arrow().num_rows
        day_rows = delta.to_pyarrow_table(filters=[("order_date", "=", dt.date(2024, 1, 1))])
        return rows, len(table.snapshots()), day_rows.num_rows, writes

    code = run(
        "dags",
        "test",
        "eos_lakehouse_daily",
        day,
        failpoints="before_commit@1=raise,after_delta_commit@1=raise",
    )
    _step(f"run of {day}, both loads crash in try 1", code)
    out.check(code == 0, "the run of eos_lakehouse_daily failed")
    first = state()
    console.print(
        f"    Iceberg: {first[0]:,} rows of the day in {first[1]} snapshot; "
        f"Delta: {first[2]:,} rows in {first[3]} write (source: {expected:,})"
    )
    out.check(first == (expected, 1, expected, 1), f"after the crashes: {first}")
    code = run("dags", "test", "eos_lakehouse_daily", day)
    _step(f"re-run of {day} (replaces the day)", code)
    out.check(code == 0, "the re-run of eos_lakehouse_daily failed")
    second = state()
    console.print(
        f"    Iceberg: {second[0]:,} rows in {second[1]} snapshots; Delta: {second[2]:,} "
        f"rows after {second[3]} writes — the day replaced, not added again"
    )
    out.check(second == (expected, 2, expected, 2), f"after the re-run: {second}")
    versions = _all(
        warehouse, "SELECT key, version FROM eos.ledger WHERE key LIKE 'lakehouse/%%' ORDER BY 1"
    )
    out.check([v for _, v in versions] == [2, 2], f"ledger versions {versions}, expected 2 and 2")
    out.happened = (
        "both loads crashed in try 1; retries landed each once; the re-run replaced the day"
    )
    out.prevented = (
        f"a Delta write repeated by the retry; the re-run adding {expected:,} rows a second "
        "time to each table"
    )
    return out


# ------------------------------------------------------------------------------- summary


def run_examples(
    admin_dsn: str,
    warehouse: str,
    env: dict[str, str],
    log: Path,
    run: Runner,
    out: Console | None = None,
) -> bool:
    """Run the example uses; print (to ``out``) their steps and the summary; True
    when every check passed. ``run(*airflow_argv, failpoints=None)`` runs Airflow."""
    global console
    if out is not None:
        console = out
    console.print(
        f"\n[bold]The example uses[/bold] (through Airflow like the sales loads, logs in {log}):"
    )
    outcomes = []
    for name, example in (
        ("analytics", lambda: analytics(admin_dsn, warehouse, env, run)),
        ("IoT", lambda: iot(warehouse, env, run)),
        ("finance", lambda: finance(admin_dsn, env, run)),
        ("lakehouse", lambda: lakehouse(warehouse, env, run, log.parent / "lake")),
    ):
        try:
            outcomes.append(example())
        except Exception as exc:
            outcomes.append(Outcome(name, happened="did not run", failures=[f"{exc}"]))
    table = Table(title="what happened, and what the ledger prevented")
    table.add_column("example")
    table.add_column("what happened")
    table.add_column("prevented")
    table.add_column("checks")
    for o in outcomes:
        checks = "[green]ok[/green]" if not o.failures else f"[red]{len(o.failures)} failed[/red]"
        table.add_row(o.example, o.happened, o.prevented, checks)
    console.print()
    console.print(table)
    for o in outcomes:
        for failure in o.failures:
            console.print(f"[red]✗ {o.example.split()[0]}: {failure}[/red]")
    return not any(o.failures for o in outcomes)
