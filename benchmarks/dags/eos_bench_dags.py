"""DAGs for P7 (benchmarks/run_all.py): the same N-task DAG twice, exactly-once and plain.

``eos_bench_exactly_once``: EOS_BENCH_TASKS mapped ``@task.exactly_once`` loads, each inserting
one row into ``bench_p7`` in its effect's transaction (key per run and map index).
``eos_bench_plain``: the same loads as plain ``@task`` functions that open a connection
through the same Airflow connection and insert the same row in their own transaction.
"""

from __future__ import annotations

import os

from airflow.sdk import dag, task

TASKS = int(os.environ.get("EOS_BENCH_TASKS", "100"))
INSERT = "INSERT INTO bench_p7 (dag, part) VALUES (%s, %s)"


@dag(schedule=None, catchup=False, max_active_tasks=TASKS)
def eos_bench_exactly_once():
    @task.exactly_once(conn_id="warehouse", key="p7/{{ run_id }}/{{ ti.map_index }}")
    def load(part: int, eos=None):
        eos.conn.execute(INSERT, ["exactly_once", part])
        return {"part": part}

    load.expand(part=list(range(TASKS)))


@dag(schedule=None, catchup=False, max_active_tasks=TASKS)
def eos_bench_plain():
    @task
    def load(part: int):
        from eos_airflow.hooks.ledger import connect_factory

        with connect_factory("warehouse")() as conn:
            conn.execute(INSERT, ["plain", part])
        return {"part": part}

    load.expand(part=list(range(TASKS)))


eos_bench_exactly_once()
eos_bench_plain()
