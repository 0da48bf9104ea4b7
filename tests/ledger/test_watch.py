"""Waiting for committed effects without Airflow: NOTIFY wake-ups, one shared connection,
no notification when nobody waits, and no lost commit across a dropped connection."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from eos_airflow import ConfigurationError, Ledger
from eos_airflow.ledger.queries import notify_channel
from eos_airflow.ledger.watch import APPLICATION_NAME, WaitSpec, Watcher, check

#: So long that only a notification (or the check after a reconnect) can wake a wait in time.
NO_POLL = 3600.0


def commit(ledger: Ledger, key: str, result: object = None) -> None:
    ledger.run(key, lambda eos: result if result is not None else {"key": key})


async def commit_later(ledger: Ledger, key: str, delay: float) -> float:
    """Commit ``key`` after ``delay`` seconds (in a thread); return when it committed."""
    await asyncio.sleep(delay)
    await asyncio.to_thread(commit, ledger, key)
    return time.monotonic()


def watcher_backends(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND datname = current_database()",
                [APPLICATION_NAME],
            )
        ]


def test_commit_while_waiting_wakes_the_wait_through_notify(db: str, ledger: Ledger):
    async def scenario() -> tuple[object, float]:
        watcher = Watcher(db, poll_interval=NO_POLL)
        waiting = asyncio.ensure_future(watcher.wait(WaitSpec(keys=("sales/2024-01-01",))))
        committed_at = await commit_later(ledger, "sales/2024-01-01", 0.5)
        verdict = await asyncio.wait_for(waiting, 10)
        return verdict, time.monotonic() - committed_at

    verdict, delay = asyncio.run(scenario())
    assert verdict.status == "committed"
    assert verdict.results == {"sales/2024-01-01": {"key": "sales/2024-01-01"}}
    print(f"commit -> wake-up delay through NOTIFY: {delay * 1000:.1f} ms")
    assert delay < 1.0


def test_commit_notifies_only_when_someone_waits(db: str, ledger: Ledger):
    channel = notify_channel("eos")
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        commit(ledger, "nobody/waits")
        assert list(listener.notifies(timeout=0.5)) == []

        async def scenario() -> None:
            watcher = Watcher(db, poll_interval=NO_POLL)
            waiting = asyncio.ensure_future(
                watcher.wait(WaitSpec(keys=("somebody/waits",), prefix="batch/"))
            )
            await asyncio.sleep(0.5)  # registered
            await asyncio.to_thread(commit, ledger, "somebody/waits")
            await asyncio.to_thread(commit, ledger, "batch/1")
            await asyncio.to_thread(commit, ledger, "other/1")
            assert (await asyncio.wait_for(waiting, 10)).status == "committed"

        asyncio.run(scenario())
        payloads = [n.payload for n in listener.notifies(timeout=0.5)]
    assert payloads == ["somebody/waits", "batch/1"]
    with psycopg.connect(db) as conn:  # the finished wait removed its waiter rows
        assert conn.execute("SELECT count(*) FROM eos.waiters").fetchone() == (0,)


def test_committed_failed_and_prefix_waits(db: str, ledger: Ledger):
    commit(ledger, "a", {"n": 1})
    with pytest.raises(RuntimeError):
        ledger.run("broken", lambda eos: (_ for _ in ()).throw(RuntimeError("boom")))
    for i in range(3):
        commit(ledger, f"maps/run1/{i}", i)

    async def scenario() -> list:
        watcher = Watcher(db, poll_interval=NO_POLL)
        return [
            await watcher.wait(spec, timeout=1.0)
            for spec in (
                WaitSpec(keys=("a",)),
                WaitSpec(keys=("a", "broken")),
                WaitSpec(keys=("a", "broken"), fail_on_failed=False),
                WaitSpec(prefix="maps/run1/", min_count=3),
                WaitSpec(prefix="maps/run1/", min_count=4),
            )
        ]

    done, failed, waits_on, three, four = asyncio.run(scenario())
    assert (done.status, done.results) == ("committed", {"a": {"n": 1}})
    assert (failed.status, failed.failed) == ("failed", ["broken"])
    assert "fail_on_failed=False" in failed.message
    assert (waits_on.status, waits_on.missing) == ("timeout", ["broken"])
    assert (three.status, three.results) == ("committed", {f"maps/run1/{i}": i for i in range(3)})
    assert four.status == "timeout" and "3 of 4 committed" in four.missing[0]
    with psycopg.connect(db) as conn:  # the sensor's synchronous check agrees
        assert check(conn, "eos", WaitSpec(keys=("a", "b"))).missing == ["b"]
    with pytest.raises(ConfigurationError, match="at least one key"):
        WaitSpec()


def test_200_waits_share_one_connection_and_all_wake(db: str, ledger: Ledger):
    keys = [f"load/{i:03d}" for i in range(200)]

    async def scenario() -> tuple[list, list[int], int]:
        watcher = Watcher(db, poll_interval=NO_POLL)
        waits = [asyncio.ensure_future(watcher.wait(WaitSpec(keys=(k,)))) for k in keys]
        await asyncio.sleep(1.0)
        backends = await asyncio.to_thread(watcher_backends, db)
        for key in keys:
            await asyncio.to_thread(commit, ledger, key)
        verdicts = await asyncio.wait_for(asyncio.gather(*waits), 30)
        return verdicts, backends, watcher.connections_opened

    verdicts, backends, opened = asyncio.run(scenario())
    assert len(backends) == 1 and opened == 1
    assert [v.status for v in verdicts] == ["committed"] * 200
    assert [next(iter(v.results)) for v in verdicts] == keys


def test_dropped_connection_mid_wait_does_not_lose_a_commit(db: str, ledger: Ledger):
    """The listener's backend is terminated; the key commits while the watcher is
    disconnected (no notification can reach it); the wait still wakes, without polling."""

    async def scenario() -> tuple[object, int, float]:
        watcher = Watcher(db, poll_interval=NO_POLL)
        waiting = asyncio.ensure_future(watcher.wait(WaitSpec(keys=("late",))))
        await asyncio.sleep(0.5)
        (pid,) = await asyncio.to_thread(watcher_backends, db)

        def kill_then_commit() -> None:
            with psycopg.connect(db, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            commit(ledger, "late")

        await asyncio.to_thread(kill_then_commit)
        committed_at = time.monotonic()
        verdict = await asyncio.wait_for(waiting, 20)
        return verdict, watcher.connections_opened, time.monotonic() - committed_at

    verdict, opened, delay = asyncio.run(scenario())
    assert verdict.status == "committed" and verdict.results == {"late": {"key": "late"}}
    assert opened == 2
    assert delay < 5.0
