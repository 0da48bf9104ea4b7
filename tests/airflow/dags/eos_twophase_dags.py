"""DAGs driven by tests/airflow/test_twophase_dags.py: transfers between two databases.

``transfer`` (the decorator, 2PC) moves 10 and ``sql_transfer`` (MultiTargetSQLOperator, 3PC)
moves 5 from account 1 of ``bank_a`` to account 1 of ``bank_b``; the decision log lives in
``bank_a``'s ledger. Keys are the day, so a rerun of the same day is the same effect.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from eos_airflow import MultiTargetSQLOperator

ARGS = {"retries": 2, "retry_delay": timedelta(seconds=1)}
BANKS = {"a": "bank_a", "b": "bank_b"}


@dag(
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    default_args=ARGS,
)
def eos_twophase():
    @task.exactly_once(
        targets=BANKS, ledger_conn_id="bank_a", protocol="2pc", key="transfer/{{ ds }}"
    )
    def transfer(eos, ds=None):
        eos.conns["a"].execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
        eos.conns["b"].execute("UPDATE accounts SET balance = balance + 10 WHERE id = 1")
        return {"day": ds, "amount": 10, "by_try": eos.attempt}

    sql_transfer = MultiTargetSQLOperator(
        task_id="sql_transfer",
        targets=BANKS,
        ledger_conn_id="bank_a",
        protocol="3pc",
        sql={
            "a": "UPDATE accounts SET balance = balance - %(amount)s WHERE id = 1",
            "b": "UPDATE accounts SET balance = balance + %(amount)s WHERE id = 1",
        },
        parameters={"amount": 5},
        key="sql_transfer/{{ ds }}",
    )

    @task
    def report(moved):
        print("REPORT transfer " + json.dumps(moved, sort_keys=True))

    moved = transfer()
    moved >> sql_transfer
    report(moved)


eos_twophase()
