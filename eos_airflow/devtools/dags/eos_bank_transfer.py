"""A transfer between two bank databases, exactly once and atomically (two-phase commit).

``transfer`` moves ``params.amount`` from account ``params.source`` in ``bank_a`` to account
``params.target`` in ``bank_b``: both databases change, or neither does, and a retry, a
cleared task or a worker killed between the two commits never moves the money twice. The
total balance over both banks is the invariant: ``check_total`` fails the run if it ever
differs from the opening total. ``settle`` records the day's transfer in both banks' journals
with ``MultiTargetSQLOperator`` (three-phase commit: the banks can finish it even while the
coordinator's database is down).

Connections ``bank_a`` and ``bank_b``: PostgreSQL databases with ``max_prepared_transactions``
> 0, the ledger created in each (``eos-airflow db migrate --conn-id bank_a``, same for
``bank_b``) and the tables from ``SETUP_SQL``. ``bank_a``'s ledger logs the commit decisions;
``eos-airflow recover --conn-id bank_a`` finishes transactions left in doubt by a crash.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from eos_airflow import MultiTargetSQLOperator

#: Run in each bank database once (both get the same tables and one account with 1,000).
SETUP_SQL = """
CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, balance numeric NOT NULL
                                     CHECK (balance >= 0));
INSERT INTO accounts VALUES (1, 1000) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS journal (day date, account int, amount numeric, note text);
"""
#: The invariant: the sum of every account in both banks.
OPENING_TOTAL = 2000
BANKS = {"a": "bank_a", "b": "bank_b"}


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=2)},
    params={"amount": 25, "source": 1, "target": 1},
    tags=["eos-airflow", "example"],
)
def eos_bank_transfer():
    @task.exactly_once(
        targets=BANKS, ledger_conn_id="bank_a", protocol="2pc", key="bank_transfer/{{ ds }}"
    )
    def transfer(eos, ds=None, params=None):
        amount = params["amount"]
        eos.conns["a"].execute(
            "UPDATE accounts SET balance = balance - %s WHERE id = %s", [amount, params["source"]]
        )
        eos.conns["b"].execute(
            "UPDATE accounts SET balance = balance + %s WHERE id = %s", [amount, params["target"]]
        )
        return {"day": ds, "amount": amount}

    settle = MultiTargetSQLOperator(
        task_id="settle",
        targets=BANKS,
        ledger_conn_id="bank_a",
        protocol="3pc",
        sql={
            "a": "INSERT INTO journal VALUES "
            "(%(day)s::date, %(source)s::int, -%(amount)s::numeric, 'sent')",
            "b": "INSERT INTO journal VALUES "
            "(%(day)s::date, %(target)s::int, %(amount)s::numeric, 'received')",
        },
        parameters={
            "day": "{{ ds }}",
            "amount": "{{ params.amount }}",
            "source": "{{ params.source }}",
            "target": "{{ params.target }}",
        },
        key="bank_journal/{{ ds }}",
    )

    @task
    def check_total() -> None:
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        total = sum(
            PostgresHook(postgres_conn_id=conn_id).get_first(
                "SELECT coalesce(sum(balance), 0) FROM accounts"
            )[0]
            for conn_id in BANKS.values()
        )
        if total != OPENING_TOTAL:
            raise ValueError(
                f"money was created or lost: the banks hold {total}, not {OPENING_TOTAL}"
            )
        print(f"total balance {total}: unchanged")

    moved = transfer()
    moved >> settle >> check_total()


eos_bank_transfer()
