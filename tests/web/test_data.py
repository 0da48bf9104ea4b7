"""What the audit page's JSON API returns, read from a real ledger (no Airflow needed)."""

from __future__ import annotations

import psycopg
import pytest

from eos_airflow import Ledger, Origin
from eos_airflow.errors import ConfigurationError
from eos_airflow.web import data

TI = Origin("sales", "load", "manual__1", -1)
LATER = Origin("sales", "load", "manual__2", -1)


class Boom(Exception):
    pass


def boom(eos) -> None:
    raise Boom("no")


@pytest.fixture
def ledger_conn(db: str):
    with Ledger(db) as ledger:
        ledger.run("sales/2024-01-01", lambda eos: {"rows": 1}, origin=TI)
        ledger.run("sales/2024-01-01", lambda eos: {"rows": 9}, origin=LATER)  # skipped
        with pytest.raises(Boom):
            ledger.run("sales/2024-01-02", boom, origin=TI)
        ledger.run(
            "stock/2024-01-01",
            lambda eos: {"rows": 2},
            origin=Origin("stock", "load", "manual__1", -1),
        )
        ledger.run("script/1", lambda eos: 1)  # written outside Airflow: no DAG
    with psycopg.connect(db, autocommit=True) as conn:
        yield conn


def test_entries_filter_like_ledger_list(ledger_conn):
    keys = lambda **kw: sorted(e["key"] for e in data.entries(ledger_conn, "eos", **kw))  # noqa: E731
    assert keys() == ["sales/2024-01-01", "sales/2024-01-02", "script/1", "stock/2024-01-01"]
    assert keys(state="failed") == ["sales/2024-01-02"]
    assert keys(dag_id="stock") == ["stock/2024-01-01"]
    assert keys(prefix="sales/") == ["sales/2024-01-01", "sales/2024-01-02"]
    assert keys(since="2999-01-01T00:00:00Z") == []
    assert keys(dag_ids={"stock"}) == ["stock/2024-01-01"]  # what the user may read
    assert keys(dag_ids=set()) == []
    with pytest.raises(ConfigurationError, match="neither a duration"):
        data.entries(ledger_conn, "eos", since="yesterday-ish")


def test_entry_timeline_and_task_instance_view(ledger_conn):
    found = data.entry(ledger_conn, "eos", "sales/2024-01-01")
    assert found["entry"]["state"] == "committed" and found["entry"]["result"] == {"rows": 1}
    assert [e["event"] for e in found["events"]] == ["claimed", "committed", "skipped"]
    assert "owner" not in found["entry"] and len(found["events"][0]["hash"]) == 64
    assert data.entry(ledger_conn, "eos", "nope") is None
    # the later run only skipped: its task instance still sees the key it touched
    later = data.ti_entries(ledger_conn, "eos", "sales", "manual__2", "load", -1)
    assert [e["entry"]["key"] for e in later] == ["sales/2024-01-01"]
    first = data.ti_entries(ledger_conn, "eos", "sales", "manual__1", "load", -1)
    assert [e["entry"]["key"] for e in first] == ["sales/2024-01-01", "sales/2024-01-02"]
    assert data.ti_entries(ledger_conn, "eos", "sales", "manual__1", "load", 3) == []


def test_activity_and_verification(ledger_conn):
    series = data.activity(ledger_conn, "eos", bucket="day")["series"]
    assert len(series) == 1
    assert {k: series[0][k] for k in ("commits", "skips", "fences", "failures")} == {
        "commits": 3,
        "skips": 1,
        "fences": 0,
        "failures": 1,
    }
    only_stock = data.activity(ledger_conn, "eos", dag_ids={"stock"})["series"]
    assert only_stock[0]["commits"] == 1
    assert data.verification(ledger_conn, "eos") | {"details": []} == {
        "ok": True,
        "events": 9,
        "keys": 4,
        "problems": 0,
        "first_bad": None,
        "details": [],
    }
    with ledger_conn.transaction(force_rollback=True):
        ledger_conn.execute("UPDATE eos.ledger SET version = 7 WHERE key = 'script/1'")
        bad = data.verification(ledger_conn, "eos")
    assert not bad["ok"] and bad["first_bad"].startswith(
        "key 'script/1': ledger row says version 7"
    )
