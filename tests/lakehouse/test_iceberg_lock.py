"""A commit waits a bounded time for a table's pointer held by another open effect."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from eos_airflow import ConfigurationError, LakehouseConflictError, Ledger, Origin
from tests.conftest import events
from tests.lakehouse.conftest import Lake

TI = Origin("lake", "load", "manual__1", -1)
DATA = pa.table({"day": ["d"], "amount": [1]})


def test_a_commit_waiting_longer_than_the_lock_timeout_is_a_retryable_conflict(
    ledger: Ledger, lake: Lake, db: str, conn
):
    props = {**lake.iceberg, "eos.pointer-lock-timeout": "0.5"}
    wh = lake.uri("wh")
    ledger.run(
        "create",
        lambda eos: bool(eos.iceberg("lake.t", schema=DATA.schema, warehouse=wh, properties=props)),
    )
    holding, release = threading.Event(), threading.Event()

    def holder(eos):
        eos.iceberg("lake.t", properties=props).append(DATA)  # holds the pointer from here
        holding.set()
        assert release.wait(30)

    first = threading.Thread(target=lambda: Ledger(db).run("holder", holder, origin=TI))
    first.start()
    assert holding.wait(30)
    try:
        with pytest.raises(LakehouseConflictError, match="for more than 0.5 s") as caught:
            ledger.run("waiter", lambda eos: eos.iceberg("lake.t", properties=props).append(DATA))
        assert caught.value.retryable
    finally:
        release.set()
        first.join(30)
    assert [e for e, _ in events(conn, "waiter")] == ["claimed", "failed"]

    # after a commit took the pointer, the effect's own statements have their setting back
    def after(eos):
        eos.iceberg("lake.t", properties=props).append(DATA)
        return eos.conn.execute("SELECT current_setting('lock_timeout')").fetchone()[0]

    assert ledger.run("after", after) == "0"


def test_a_bad_lock_timeout_is_refused(ledger: Ledger, lake: Lake):
    props = {**lake.iceberg, "eos.pointer-lock-timeout": "soon"}

    def fn(eos):
        eos.iceberg("lake.t", schema=DATA.schema, warehouse=lake.uri("wh"), properties=props)
        eos.iceberg("lake.t", properties=props).append(DATA)

    with pytest.raises(ConfigurationError, match="eos.pointer-lock-timeout"):
        ledger.run("k", fn, origin=TI)
