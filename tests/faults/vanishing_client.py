"""The owner whose network vanishes (run inside a network namespace by test_liveness.py).

``python -m tests.faults.vanishing_client DSN KEY MODE LIVENESS_TIMEOUT``: claims KEY as run
``run_a`` through :class:`eos_airflow.Ledger`, writes a row, prints ``claimed <backend pid>``
and then, holding the claim, does what MODE says until it is killed:

- ``idle``: nothing (the session is idle in its transaction);
- ``statement``: runs a long, silent statement (``pg_sleep``);
- ``sending``: runs a statement that keeps sending to the client (a NOTICE every 50 ms), so
  the server always has unacknowledged data once the network is gone.
"""

from __future__ import annotations

import sys
import time

from eos_airflow import Ledger, Origin

SENDING = """DO $$ BEGIN
  FOR i IN 1..100000 LOOP RAISE NOTICE '%', repeat('x', 2000); PERFORM pg_sleep(0.05);
  END LOOP; END $$"""


def main(dsn: str, key: str, mode: str, liveness: str) -> None:
    def hold(eos):
        eos.conn.execute("INSERT INTO t (who) VALUES ('vanished owner')")
        print("claimed", eos.conn.info.backend_pid, flush=True)
        if mode == "idle":
            time.sleep(3600)
        elif mode == "statement":
            eos.conn.execute("SELECT pg_sleep(3600)")
        elif mode == "sending":
            eos.conn.add_notice_handler(lambda diagnostic: None)
            eos.conn.execute(SENDING)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        return "vanished owner"

    with Ledger(dsn, liveness_timeout=float(liveness)) as ledger:
        ledger.run(key, hold, origin=Origin("liveness", "load", "run_a", -1))


if __name__ == "__main__":
    main(*sys.argv[1:])
