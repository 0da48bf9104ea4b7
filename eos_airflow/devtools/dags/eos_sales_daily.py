"""Daily sales load, exactly once.

``load_sales`` aggregates one day of raw sales into ``sales_daily``; ``publish_totals``
writes the day's total. Both are keyed by the day (``sales_daily/{{ ds }}``), so retries,
cleared tasks, a re-triggered run and a worker killed after its commit all leave exactly
one copy of each day. ``report`` receives the stored result even when the load was skipped.
``load_sales`` reports the asset ``sales_daily`` once per committed version of a day (a
re-run that skips reports nothing), so a DAG scheduled on it runs once per new day.
``load_sales`` reports the asset ``sales_daily`` once per committed version of a day (a
re-run that skips reports nothing), so a DAG scheduled on it runs once per new day.

Connection ``eos_warehouse``: the warehouse database, with the ledger created by
``eos-airflow db migrate --conn-id eos_warehouse`` and the tables from ``SETUP_SQL``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task

from eos_airflow import ExactlyOnceSQLOperator

SETUP_SQL = """
CREATE TABLE IF NOT EXISTS sales_raw (day date, region text, amount numeric);
CREATE TABLE IF NOT EXISTS sales_daily (day date, region text, amount numeric);
CREATE TABLE IF NOT EXISTS sales_totals (day date, amount numeric);
"""

SALES_DAILY = Asset(
    name="sales_daily", uri="postgres://warehouse:5432/warehouse/public/sales_daily"
)

SALES_DAILY = Asset(
    name="sales_daily", uri="postgres://warehouse:5432/warehouse/public/sales_daily"
)


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=2)},
    tags=["eos-airflow", "example"],
)
def eos_sales_daily():
    @task.exactly_once(conn_id="eos_warehouse", key="sales_daily/{{ ds }}", outlets=[SALES_DAILY])
    def load_sales(eos, ds=None):
        cursor = eos.conn.execute(
            "INSERT INTO sales_daily (day, region, amount) "
            "SELECT day, region, sum(amount) FROM sales_raw WHERE day = %s GROUP BY day, region",
            [ds],
        )
        return {"day": ds, "rows": cursor.rowcount}

    publish_totals = ExactlyOnceSQLOperator(
        task_id="publish_totals",
        conn_id="eos_warehouse",
        sql="INSERT INTO sales_totals (day, amount) "
        "SELECT day, sum(amount) FROM sales_daily WHERE day = %(day)s GROUP BY day",
        parameters={"day": "{{ ds }}"},
        key="sales_totals/{{ ds }}",
    )

    @task
    def report(loaded: dict) -> None:
        print(f"sales of {loaded['day']}: {loaded['rows']} region rows loaded")

    loaded = load_sales()
    loaded >> publish_totals
    report(loaded)


eos_sales_daily()
