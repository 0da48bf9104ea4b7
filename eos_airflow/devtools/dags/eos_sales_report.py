"""Daily sales report, gated on the committed load of the day.

``wait_for_sales`` waits until ``sales_daily/{{ ds }}`` (written exactly once by
``eos_sales_daily.load_sales``, see dags/eos_sales_daily.py) is committed in the ledger:
the report never reads a half-written or rolled-back day. It defers to the triggerer, where
the ledger's commit wakes it through NOTIFY (a slow poll is the fallback), and hands the
load's stored result to ``report`` as XCom.

Connection ``eos_warehouse``: the warehouse database holding the ledger (as for the load).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from eos_airflow import LedgerSensor


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    tags=["eos-airflow", "example"],
)
def eos_sales_report():
    wait_for_sales = LedgerSensor(
        task_id="wait_for_sales",
        conn_id="eos_warehouse",
        key="sales_daily/{{ ds }}",
        deferrable=True,
        timeout=timedelta(hours=6),
    )

    @task
    def report(committed: dict) -> None:
        loaded = committed[next(iter(committed))]
        print(f"sales of {loaded['day']}: {loaded['rows']} region rows, committed exactly once")

    report(wait_for_sales.output)


eos_sales_report()
