"""Every kind of ledger connection carries the liveness settings on its own backend.

Read back from ``pg_settings`` by the backend itself: connections of ``Ledger(dsn)``, of the
Airflow hook (operators, decorators, the sensor in poke mode), of the watcher behind
``LedgerTrigger``, and of the CLI (``eos-airflow doctor`` reports them). The settings are
applied after connecting, never as a startup ``options`` parameter (PgBouncer refuses those).

The server of tests/faults listens on TCP (a Unix-socket session reads the tcp_* settings as
0), so this holds against PostgreSQL 15 and the embedded 18 alike.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from eos_airflow import ConfigurationError, Ledger
from eos_airflow.hooks.ledger import airflow_conn_json
from eos_airflow.ledger.connection import SERVER_SETTINGS, Liveness
from eos_airflow.ledger.watch import WaitSpec, Watcher
from tests.conftest import ROOT


def expected(timeout: float) -> dict[str, str]:
    """What pg_settings shows (base units: seconds, milliseconds) for ``timeout``."""
    return {
        "tcp_keepalives_idle": str(int(timeout // 3)),
        "tcp_keepalives_interval": str(int(timeout // 6)),
        "tcp_keepalives_count": "4",
        "tcp_user_timeout": str(int(timeout * 1000)),
        "client_connection_check_interval": str(int(timeout * 1000) // 6),
    }


#: What the server's sessions get without liveness: the kernel's idle time before the first
#: keepalive probe (7200 s unless the machine changed it).
KERNEL_KEEPALIVE_TIME = Path("/proc/sys/net/ipv4/tcp_keepalive_time").read_text().strip()
SHOW = "SELECT name, setting, source FROM pg_settings WHERE name = ANY(%s) ORDER BY name"


def shown(rows) -> dict[str, str]:
    return {name: setting for name, setting, _ in rows}


def test_ledger_connections_carry_the_settings(own_db: str, monkeypatch):
    monkeypatch.delenv("EOS_LIVENESS_TIMEOUT", raising=False)
    for kwargs, env, timeout in (
        ({}, None, 60),
        ({"liveness_timeout": 12}, None, 12),
        ({}, "30", 30),
        ({"liveness_timeout": 24}, "30", 24),
    ):
        if env is not None:
            monkeypatch.setenv("EOS_LIVENESS_TIMEOUT", env)
        with Ledger(own_db, **kwargs) as ledger:
            conn = ledger.connection()
            rows = conn.execute(SHOW, [list(SERVER_SETTINGS)]).fetchall()
            assert shown(rows) == expected(timeout), (kwargs, env)
            assert {source for _, _, source in rows} == {"session"}
            assert "options" not in conn.info.get_parameters()
            # libpq's client-side keepalives: the same timers, on the worker's socket
            assert conn.info.get_parameters()["keepalives_idle"] == str(int(timeout // 3))
            # and a connection that ran an effect keeps them (the pool reuses it)
            ledger.putconn(conn)
            ledger.run(f"settings/{timeout}", lambda eos: None)
            again = ledger.connection()
            assert shown(again.execute(SHOW, [list(SERVER_SETTINGS)])) == expected(timeout)
            ledger.putconn(again)


def test_liveness_off_leaves_the_server_settings_alone(own_db: str, monkeypatch):
    monkeypatch.setenv("EOS_LIVENESS_TIMEOUT", "0")
    with Ledger(own_db) as ledger:
        conn = ledger.connection()
        rows = conn.execute(SHOW, [list(SERVER_SETTINGS)]).fetchall()
        assert "session" not in {source for _, _, source in rows}
        assert shown(rows)["tcp_keepalives_idle"] == KERNEL_KEEPALIVE_TIME  # often 2 h
        ledger.putconn(conn)


@pytest.mark.parametrize("bad", ["soon", "-1", "2", "nan"])
def test_a_bad_liveness_timeout_says_what_to_set(own_db: str, monkeypatch, bad):
    monkeypatch.setenv("EOS_LIVENESS_TIMEOUT", bad)
    with pytest.raises(ConfigurationError, match="EOS_LIVENESS_TIMEOUT") as raised:
        Ledger(own_db)
    assert "0" in str(raised.value)  # names the way to turn it off


HOOK = textwrap.dedent("""
    import json, os, socket
    from eos_airflow.hooks.ledger import connect_factory
    conn = connect_factory("ledger")()
    rows = conn.execute(
        "SELECT name, setting, source FROM pg_settings WHERE name = ANY(%s)",
        [SETTINGS]).fetchall()
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    print(json.dumps({"rows": rows, "autocommit": conn.autocommit,
                      "keepidle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                      "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}))
""")


@pytest.mark.parametrize("env, timeout", [(None, 60), ("30", 30)])
def test_airflow_hook_connections_carry_the_settings(own_db: str, tmp_path, env, timeout):
    environ = {
        "PATH": "/usr/bin:/bin",
        "AIRFLOW_HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "AIRFLOW_CONN_LEDGER": airflow_conn_json(own_db),
    }
    if env is not None:
        environ["EOS_LIVENESS_TIMEOUT"] = env
    code = HOOK.replace("SETTINGS", repr(list(SERVER_SETTINGS)))
    done = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert shown(found["rows"]) == expected(timeout)
    assert {source for _, _, source in found["rows"]} == {"session"}
    assert found["autocommit"] is True
    # the hook passes no libpq keepalives: they are set on its socket
    assert found["keepalive"] == 1 and found["keepidle"] == timeout // 3


def test_the_watchers_connection_carries_the_settings_and_its_lock_timeout(
    own_db: str, monkeypatch
):
    monkeypatch.delenv("EOS_LIVENESS_TIMEOUT", raising=False)

    async def scenario() -> tuple[list, dict[str, str]]:
        watcher = Watcher(own_db, poll_interval=0.2)
        waiting = asyncio.ensure_future(watcher.wait(WaitSpec(keys=("never",)), timeout=30))
        for _ in range(100):
            if watcher.connection is not None:
                break
            await asyncio.sleep(0.05)
        conn = watcher.connection
        assert conn is not None, "the watcher opened no connection"
        cur = await conn.execute(SHOW, [[*SERVER_SETTINGS, "lock_timeout"]])
        rows = await cur.fetchall()
        parameters = conn.info.get_parameters()
        waiting.cancel()
        return rows, parameters

    rows, parameters = asyncio.run(scenario())
    assert shown(rows) == {**expected(60), "lock_timeout": "5000"}
    assert {source for _, _, source in rows} == {"session"}
    assert "options" not in parameters  # set after connecting, not as a startup parameter


def test_doctor_reports_the_cli_sessions_liveness(own_db: str, tmp_path):
    def doctor(**env: str) -> dict[str, str]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "eos_airflow.cli.main",
                "doctor",
                "--dsn",
                own_db,
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(ROOT),
                "AIRFLOW_HOME": str(tmp_path),
                **env,
            },
        )
        return {c["check"]: c for c in json.loads(done.stdout)["checks"]}["liveness"]

    on = doctor()
    assert on["status"] == "ok"
    bound = Liveness(60).bound
    assert on["detail"].startswith(
        f"a worker that goes silent loses its session, and its keys, within {bound:g} s"
    )
    assert "tcp_keepalives_idle=20" in on["detail"] and "tcp_user_timeout=60000" in on["detail"]
    off = doctor(EOS_LIVENESS_TIMEOUT="0")
    assert off["status"] == "warn" and "EOS_LIVENESS_TIMEOUT=0" in off["detail"]


def test_settings_are_not_startup_options_so_a_pooler_accepts_them(own_db: str):
    """PgBouncer refuses unknown startup parameters: nothing of ours may travel in the
    startup packet's ``options`` (a client connection string's own options stay its own)."""
    with Ledger(own_db) as ledger:
        conn = ledger.connection()
        assert conn.info.get_parameters().get("options") is None
        ledger.putconn(conn)
    with psycopg.connect(own_db) as plain:  # the server default, for comparison
        assert plain.execute("SHOW tcp_keepalives_idle").fetchone()[0] == KERNEL_KEEPALIVE_TIME
