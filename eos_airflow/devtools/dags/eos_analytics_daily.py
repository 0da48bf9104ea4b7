"""Daily analytics partitions copied from the operational database, exactly once.

- ``orders_daily`` (``ExactlyOnceTransferOperator``, ``mode="replace"``) copies one day of
  orders from ``eos_source`` into ``analytics.orders_daily`` with binary COPY: it deletes the
  day (``replace_where``) and inserts the new rows in one transaction with the ledger mark,
  so readers see the old day until the new one commits. The key is the day and
  ``on_committed="replace"``: a backfill or a cleared run of a day replaces that day's
  partition (ledger ``version`` + 1) instead of adding it twice, and a retry after a crash
  either finds nothing written or the committed day.
- ``revenue_daily`` aggregates the copied day, also replacing it.
- ``events_history`` (``chunk_rows=``) shows a long load: it commits every 50,000 rows with a
  recovery point, staged (``visibility="atomic"``) so that readers see the whole day or
  none of it; a retry after a crash resumes after the last committed chunk. The query orders
  by the key, as a resumed read requires.

Connections: ``eos_source`` (the operational PostgreSQL) and ``eos_warehouse`` (the
analytics PostgreSQL with the ledger: ``eos-airflow db migrate --conn-id eos_warehouse``;
tables from ``SETUP_SQL``). Backfill a month with
``airflow backfill create --dag-id eos_analytics_daily --from-date 2024-01-01 --to-date 2024-01-31``:
every day is replaced, none duplicated.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag

from eos_airflow import ExactlyOnceSQLOperator, ExactlyOnceTransferOperator

#: Tables in the warehouse (the source has ``orders`` and ``order_events`` with these columns).
SETUP_SQL = """
CREATE SCHEMA IF NOT EXISTS analytics;
CREATE TABLE IF NOT EXISTS analytics.orders_daily (order_id bigint, day date,
    customer_id bigint, amount numeric(12, 2));
CREATE TABLE IF NOT EXISTS analytics.revenue_daily (day date PRIMARY KEY, orders bigint,
    revenue numeric(14, 2));
CREATE TABLE IF NOT EXISTS analytics.order_events (event_id bigint, day date, order_id bigint,
    kind text, at timestamptz);
"""


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=1)},
    tags=["eos-airflow", "example"],
)
def eos_analytics_daily():
    orders = ExactlyOnceTransferOperator(
        task_id="orders_daily",
        source_conn_id="eos_source",
        sql="SELECT id, created_at::date, customer_id, amount FROM orders "
        "WHERE created_at >= %(day)s::date AND created_at < %(day)s::date + 1",
        parameters={"day": "{{ ds }}"},
        target_conn_id="eos_warehouse",
        table="analytics.orders_daily",
        mode="replace",
        replace_where="day = %(day)s::date",
        key="analytics/orders_daily/{{ ds }}",
        on_committed="replace",
    )
    revenue = ExactlyOnceSQLOperator(
        task_id="revenue_daily",
        conn_id="eos_warehouse",
        sql=[
            "DELETE FROM analytics.revenue_daily WHERE day = %(day)s::date",
            "INSERT INTO analytics.revenue_daily SELECT day, count(*), sum(amount) "
            "FROM analytics.orders_daily WHERE day = %(day)s::date GROUP BY day",
        ],
        parameters={"day": "{{ ds }}"},
        key="analytics/revenue_daily/{{ ds }}",
        on_committed="replace",
    )
    ExactlyOnceTransferOperator(
        task_id="events_history",
        source_conn_id="eos_source",
        sql="SELECT id, at::date, order_id, kind, at FROM order_events "
        "WHERE at >= %(day)s::date AND at < %(day)s::date + 1 ORDER BY id",
        parameters={"day": "{{ ds }}"},
        target_conn_id="eos_warehouse",
        table="analytics.order_events",
        mode="replace",
        replace_where="day = %(day)s::date",
        chunk_rows=50_000,
        visibility="atomic",
        key="analytics/order_events/{{ ds }}",
        on_committed="replace",
    )
    orders >> revenue


eos_analytics_daily()
