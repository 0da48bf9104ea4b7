"""P8's other side: the same one-row write guarded by a Prefect 3 transaction (run_all.py).

Runs in its own virtualenv (benchmarks/.prefect-venv: prefect, prefect-redis, psycopg), as a
subprocess of ``run_all.py``, which sends one command per line on stdin and reads one JSON line
per command on stdout, so that its rounds interleave with the eos-airflow side's:

    round TAG N   ->  {"bare": [s, ...], "prefect": [s, ...]}   (seconds per call)
    quit

``prefect`` is one call of::

    with transaction(key=f"p8/{TAG}/{i}", store=store,
                     isolation_level=IsolationLevel.SERIALIZABLE) as txn:
        if not txn.is_committed():
            conn.execute(INSERT); conn.commit()
            txn.stage({"n": i})

with ``store = ResultStore(result_storage=LocalFileSystem(basepath=...),
lock_manager=RedisLockManager(...))``: the key's Redis lock is taken, the result record looked
up, the row written and committed in PostgreSQL, the record written to the result store and
the lock released. ``bare`` is the INSERT + COMMIT alone on the same connection. No Prefect
server or flow run is involved (the transaction API works outside flows).

    python prefect_side.py DSN RESULTS_DIR REDIS_HOST REDIS_PORT REDIS_DB
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import psycopg
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.transactions import IsolationLevel, transaction
from prefect_redis.locking import RedisLockManager

INSERT = "INSERT INTO bench_rows (who, n) VALUES (%s, %s)"


def main() -> int:
    dsn, results_dir, redis_host, redis_port, redis_db = sys.argv[1:6]
    store = ResultStore(
        result_storage=LocalFileSystem(basepath=results_dir),
        lock_manager=RedisLockManager(host=redis_host, port=int(redis_port), db=int(redis_db)),
    )
    conn = psycopg.connect(dsn)
    run = uuid.uuid4().hex[:8]
    clock = time.perf_counter
    n = 0

    def bare(i: int) -> None:
        conn.execute(INSERT, ["bare-prefect", i])
        conn.commit()

    def guarded(key: str, i: int) -> None:
        with transaction(key=key, store=store, isolation_level=IsolationLevel.SERIALIZABLE) as txn:
            if not txn.is_committed():
                conn.execute(INSERT, ["prefect", i])
                conn.commit()
                txn.stage({"n": i})

    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        tag, count = parts[1], int(parts[2])
        out: dict[str, list[float]] = {"bare": [], "prefect": []}
        for _ in range(count):
            n += 1
            t0 = clock()
            bare(n)
            out["bare"].append(clock() - t0)
        for i in range(count):
            n += 1
            t0 = clock()
            guarded(f"p8-{run}-{tag}-{i}", n)
            out["prefect"].append(clock() - t0)
        print(json.dumps(out), flush=True)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
