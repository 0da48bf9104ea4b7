"""DAGs for the end-to-end runs under the real scheduler (tests/airflow/test_e2e_stack.py).

``eos_e2e_mapped``: EOS_E2E_PARTS mapped exactly-once loads, each busy for a moment inside its
effect so that workers killed at random land mid-effect, and retried by Airflow.
``eos_e2e_zombie``: one load that the test freezes (SIGSTOP) so a newer try starts.
"""

from __future__ import annotations

import os
import random
import time
from datetime import timedelta

from airflow.sdk import dag, task

PARTS = int(os.environ.get("EOS_E2E_PARTS", "60"))


@dag(
    schedule=None,
    catchup=False,
    max_active_tasks=16,
    default_args={"retries": 6, "retry_delay": timedelta(seconds=1)},
)
def eos_e2e_mapped():
    @task.exactly_once(conn_id="warehouse", key="e2e/{{ run_id }}/{{ ti.map_index }}")
    def load(part: int, eos=None):
        eos.conn.execute(
            "INSERT INTO e2e_parts (part, key, written_by_try) VALUES (%s, %s, %s)",
            [part, eos.key, eos.attempt],
        )
        time.sleep(random.uniform(0.5, 2.5))  # work in flight: a kill now rolls it back
        return {"part": part}

    load.expand(part=list(range(PARTS)))


@dag(schedule=None, catchup=False, default_args={"retries": 2, "retry_delay": timedelta(seconds=1)})
def eos_e2e_zombie():
    @task.exactly_once(conn_id="warehouse", key="zombie/{{ run_id }}")
    def load(eos=None):
        eos.conn.execute(
            "INSERT INTO e2e_parts (part, key, written_by_try) VALUES (0, %s, %s)",
            [eos.key, eos.attempt],
        )
        if eos.attempt == 1:
            time.sleep(8)  # the test freezes this try here, inside its open effect
        return {"try": eos.attempt}

    load()


eos_e2e_mapped()
eos_e2e_zombie()
