"""The same daily load as ``eos_sales_daily`` written as a plain ``@task``: the baseline the
demo compares against. It fails the same way (``EOS_FAILPOINTS``) after its commit, and
Airflow's retry writes the day a second time.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.sdk import dag, task

from eos_airflow import failpoints


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=2)},
    tags=["eos-airflow", "example", "baseline"],
)
def plain_sales_daily():
    @task
    def load_sales(ds=None, ti=None):
        with PostgresHook(postgres_conn_id="eos_warehouse").get_conn() as conn:
            conn.execute(
                "INSERT INTO sales_daily_plain (day, region, amount) "
                "SELECT day, region, sum(amount) FROM sales_raw WHERE day = %s "
                "GROUP BY day, region",
                [ds],
            )
            conn.commit()
        failpoints.check("after_commit", attempt=ti.try_number)  # the same crash as the demo's
        return {"day": ds}

    load_sales()


plain_sales_daily()
