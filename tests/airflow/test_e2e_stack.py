"""End to end under the real scheduler: workers SIGKILLed mid-task, a scheduler restart, and a
frozen (SIGSTOP) zombie, with the LocalExecutor and the CeleryExecutor.

The stack is :class:`eos_airflow.devtools.stack.AirflowStack` — the docker-compose topology as local
processes. Heartbeat-timeout detection is configured short so that Airflow notices killed and
frozen tries within seconds and starts the next try, as it would after 5 minutes in production.

Heavy (a few minutes each): ``@pytest.mark.slow``, run with EOS_SLOW=1; EOS_E2E_PARTS (default
60) and EOS_E2E_KILLS (default 8) size the mapped run.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from eos_airflow.devtools.stack import AirflowStack
from eos_airflow.ledger.chain import verify

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

E2E_DAGS = Path(__file__).parent / "e2e_dags"
PARTS = int(os.environ.get("EOS_E2E_PARTS", "60"))
KILLS = int(os.environ.get("EOS_E2E_KILLS", "8"))

FAST_FAILURE_DETECTION = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
}


@pytest.fixture
def warehouse(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE e2e_parts (part int, key text, written_by_try int)")
    return db


def make_stack(
    airflow, tmp_path: Path, executor: str, failpoints: str | None = None
) -> AirflowStack:
    env = {
        **FAST_FAILURE_DETECTION,
        "EOS_E2E_PARTS": str(PARTS),
        "AIRFLOW_CONN_WAREHOUSE": airflow.env["AIRFLOW_CONN_WAREHOUSE"],
    }
    if failpoints:
        env["EOS_FAILPOINTS"] = failpoints
    broker = "redis://127.0.0.1:6379/7"
    if executor == "celery":
        import redis

        redis.Redis.from_url(broker).flushdb()
    return AirflowStack(
        tmp_path / "home",
        airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        E2E_DAGS,
        executor=executor,
        workers=2,
        parallelism=6,
        broker_url=broker,
        env=env,
        log_dir=tmp_path / "logs",
    )


def ledger_states(conn: psycopg.Connection, prefix: str) -> dict[str, tuple[str, int]]:
    return {
        k: (s, a)
        for k, s, a in conn.execute(
            "SELECT key, state::text, attempt FROM eos.ledger WHERE key LIKE %s", [prefix + "%"]
        )
    }


@pytest.mark.parametrize("executor", ["local", "celery"])
def test_mapped_effects_survive_killed_workers_and_a_scheduler_restart(
    airflow, warehouse, tmp_path, executor
):
    """≥ 50 mapped exactly-once loads; tries killed mid-effect and right after their commit,
    a whole Celery worker lost, the scheduler restarted: every partition written once."""
    # a 2 s pause after each commit, before Airflow hears of it: the window in which a
    # killed worker leaves a committed effect that Airflow will run again
    stack = make_stack(airflow, tmp_path, executor, failpoints="after_commit=sleep:2")
    rng = random.Random(int(os.environ.get("EOS_E2E_SEED", "0")) or None)
    kills = Counter()
    victims: list[tuple[str, int]] = []  # (key, try) of every task process killed
    with stack.start(wait_for_dags=["eos_e2e_mapped"]):
        run_id = stack.trigger("eos_e2e_mapped")
        prefix = f"e2e/{run_id}/"
        next_kill = time.monotonic() + 8
        restarted = worker_lost = False

        def chaos() -> None:
            nonlocal next_kill, restarted, worker_lost
            if sum(kills.values()) >= KILLS or time.monotonic() < next_kill:
                return
            next_kill = time.monotonic() + rng.uniform(1.5, 4)
            if executor == "celery" and not worker_lost and sum(kills.values()) == KILLS // 2:
                worker_lost = True
                stack.kill_worker("worker-1")  # with every task it was running
                kills["worker"] += 1
                return
            with psycopg.connect(warehouse, autocommit=True) as conn:
                states = ledger_states(conn, prefix)
            after_commit, mid_effect = [], []
            for proc in stack.task_processes("eos_e2e_mapped"):
                state, attempt = states.get(f"{prefix}{proc.map_index}", (None, None))
                if attempt != proc.try_number:
                    continue  # a later try of a key: its claim has not happened yet
                if state == "committed":  # the try that committed, before Airflow heard
                    after_commit.append(proc)
                elif state == "running":
                    mid_effect.append(proc)
            want_after = kills["after_commit"] <= kills["mid_effect"]
            pool = (after_commit or mid_effect) if want_after else (mid_effect or after_commit)
            if not pool:
                return
            victim = rng.choice(pool)
            victim.signal(signal.SIGKILL)
            victims.append((f"{prefix}{victim.map_index}", victim.try_number))
            kills["after_commit" if victim in after_commit else "mid_effect"] += 1
            if not restarted and sum(kills.values()) >= KILLS // 2 + 1:
                restarted = True
                stack.restart_component("scheduler")

        try:
            state = stack.wait_for_run("eos_e2e_mapped", run_id, timeout=900, on_tick=chaos)
        except TimeoutError:
            raise AssertionError(stack.log_tail()) from None
        tis = stack.task_states("eos_e2e_mapped", run_id)
    assert state == "success", (tis, stack.log_tail())
    assert restarted and kills["after_commit"] >= 1 and kills["mid_effect"] >= 1, kills
    assert len(tis) == PARTS

    with psycopg.connect(warehouse, autocommit=True) as conn:
        written = Counter(
            p
            for (p,) in conn.execute("SELECT part FROM e2e_parts WHERE key LIKE %s", [prefix + "%"])
        )
        assert written == Counter(range(PARTS)), "every partition exactly once"
        states = ledger_states(conn, prefix)
        assert sorted(states) == sorted(f"{prefix}{i}" for i in range(PARTS))
        assert {s for s, _ in states.values()} == {"committed"}
        events = Counter(
            e
            for (e,) in conn.execute(
                "SELECT event::text FROM eos.ledger_events WHERE key LIKE %s", [prefix + "%"]
            )
        )
        history = {
            key: conn.execute(
                "SELECT event::text, attempt, detail FROM eos.ledger_events WHERE key = %s "
                "ORDER BY seq",
                [key],
            ).fetchall()
            for key in {k for k, _ in victims}
        }
        took_over = conn.execute(
            "SELECT count(*) FROM eos.ledger_events WHERE key LIKE %s AND event = 'claimed' "
            "AND detail ? 'took_over'",
            [prefix + "%"],
        ).fetchone()[0]
        assert verify(conn).ok
    assert events["committed"] == PARTS  # one commit per partition, never a second
    # Each killed try, judged by its key's history rather than by the moment it was picked
    # (a try seen running may commit before the signal lands): one that had committed is
    # followed by a later try's skip; one that had not is taken over by a later try.
    fates = Counter()
    for key, killed_try in victims:
        trail = history[key]
        commit_at = next(
            (i for i, (e, a, _) in enumerate(trail) if e == "committed" and a == killed_try), None
        )
        if commit_at is not None:
            fates["committed, then skipped"] += 1
            assert any(e == "skipped" and a > killed_try for e, a, _ in trail[commit_at:]), (
                key,
                killed_try,
                trail,
            )
        else:
            fates["taken over"] += 1
            assert any(
                e == "claimed"
                and a > killed_try
                and (d.get("took_over") or {}).get("attempt") == killed_try
                for e, a, d in trail
            ), (key, killed_try, trail)
    assert fates["taken over"] >= 1 and fates["committed, then skipped"] >= 1, fates
    tries = Counter(n for _, n in tis.values())
    print(
        f"\n{executor}: kills {dict(kills)}, fates {dict(fates)}, events {dict(events)}, "
        f"took over {took_over}, "
        f"final tries {dict(sorted(tries.items()))}"
    )


@pytest.mark.parametrize("executor", ["local", "celery"])
def test_a_frozen_try_resumed_after_the_next_try_committed_is_fenced(
    airflow, warehouse, tmp_path, executor
):
    """A zombie for real: try 1 is frozen with SIGSTOP inside its effect until its heartbeat
    times out; Airflow starts try 2, which commits; try 1 resumes and tries to commit."""
    stack = make_stack(airflow, tmp_path, executor)
    with stack.start(wait_for_dags=["eos_e2e_zombie"]):
        run_id = stack.trigger("eos_e2e_zombie")
        key = f"zombie/{run_id}"

        def try_one_in_effect():
            for proc in stack.task_processes("eos_e2e_zombie"):
                if proc.try_number == 1:
                    with psycopg.connect(warehouse, autocommit=True) as conn:
                        if ledger_states(conn, key).get(key) == ("running", 1):
                            return proc
            return None

        frozen = None

        def freeze() -> bool:
            nonlocal frozen
            frozen = try_one_in_effect()
            return frozen is not None

        stack.wait_until(freeze, 240, "try 1 to be inside its effect")
        frozen.signal(signal.SIGSTOP)
        try:

            def try_two_committed() -> bool:
                with psycopg.connect(warehouse, autocommit=True) as conn:
                    return ledger_states(conn, key).get(key) == ("committed", 2)

            stack.wait_until(
                try_two_committed, 240, "Airflow to give up on the frozen try and try 2 to commit"
            )
        finally:
            frozen.runner.send_signal(signal.SIGCONT)  # the task first: it commits now
            time.sleep(3)
            frozen.signal(signal.SIGCONT)
        with psycopg.connect(warehouse, autocommit=True) as conn:
            stack.wait_until(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM eos.ledger_events WHERE key = %s AND event = 'fenced'",
                        [key],
                    ).fetchone()[0]
                    >= 1
                ),
                60,
                "the resumed try 1 to be fenced",
            )
        state = stack.wait_for_run("eos_e2e_zombie", run_id, timeout=240)
    assert state == "success", stack.log_tail()
    with psycopg.connect(warehouse, autocommit=True) as conn:
        rows = conn.execute("SELECT written_by_try FROM e2e_parts WHERE key = %s", [key]).fetchall()
        fenced = conn.execute(
            "SELECT attempt, detail->>'step' FROM eos.ledger_events WHERE key = %s "
            "AND event = 'fenced'",
            [key],
        ).fetchall()
        entry = conn.execute(
            "SELECT state::text, attempt, version, result FROM eos.ledger WHERE key = %s", [key]
        ).fetchone()
    assert rows == [(2,)], "try 1's write was rolled back; try 2's landed once"
    assert fenced == [(1, "commit")]
    assert entry == ("committed", 2, 1, {"try": 2})
