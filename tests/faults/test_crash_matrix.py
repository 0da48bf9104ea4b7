"""The crash matrix: every failpoint step of every protocol × {raise, exit, sleep}.

Protocols (tests/faults/crash.py): a single-database effect, a chunked effect
(``eos.checkpoints``), ``incremental()`` with ``eos.offsets``, ``transfer()`` (COPY between
databases, whole or chunked, append or atomic replace), effects publishing to the outbox and
the relay to NATS JetStream and to Kafka (librdkafka's mock cluster), and effects across two
databases with two- and three-phase commit.

Each run builds a few keys with random sizes and runs them in a forked child whose
``EOS_FAILPOINTS`` injects the fault at the K-th time the child reaches the step
(``STEP@1#K=ACTION``; K random among the hits the run makes):

- ``raise``: the attempt fails there; the child goes on with its next keys;
- ``exit``: the child dies there (``os._exit``, like SIGKILL);
- ``sleep``: the child pauses there while a competitor runs: the next try of the same task
  instance (it takes the key over, and the sleeper must be fenced) or another run of the key
  with a ``wait_timeout`` shorter than the sleep (it must time out or skip).

Then the run is recovered — the next try of every key, sometimes after ``eos-airflow recover``
(2PC/3PC: also ``MultiLedger.recover``) — and checked: every key committed exactly once, with
the result every caller was told (nothing told committed is lost, no caller told a different
result), the target holding exactly the committed writes (no duplicates, no partial writes),
all outbox messages delivered and each id at the broker. After the runs of a protocol: the hash
chains verify, no key is left unfinished and no ``eos:`` transaction is left prepared.

The default run does every step of every protocol once (actions rotate); the slow tier does
EOS_CRASH_RUNS runs (default 1,000) spread over every step × action. The seed is printed;
EOS_FAULT_SEED=<seed> replays a run's choices.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from tests.conftest import create_database, drop_database, prepared_transactions_or_skip
from tests.faults import crash, crash_lake

SEED = int(os.environ.get("EOS_FAULT_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
RUNS = int(os.environ.get("EOS_CRASH_RUNS", "0")) or 1000
ACTIONS = ("raise", "exit", "sleep")
SCENARIOS = {
    cls.name: cls
    for cls in (
        crash.Local,
        crash.Chunked,
        crash.Incremental,
        crash.Transfer,
        crash.OutboxNats,
        crash.OutboxKafka,
        crash.TwoPhase,
        crash.ThreePhase,
        crash_lake.Iceberg,
        crash_lake.IcebergS3,
        crash_lake.Delta,
        crash_lake.DeltaS3,
    )
}
NATS_URL = os.environ.get("EOS_TEST_NATS_URL", "nats://127.0.0.1:4222")

#: The mock Kafka cluster lives in a process of its own, so that the test process (which forks
#: a child per attempt) never runs librdkafka's threads.
KAFKA_OWNER = """
import sys, confluent_kafka
owner = confluent_kafka.Producer({"test.mock.num.brokers": 3, "log_level": 0})
brokers = owner.list_topics(timeout=10).brokers.values()
print(",".join(f"{b.host}:{b.port}" for b in brokers), flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def kafka_bootstrap() -> Iterator[str]:
    pytest.importorskip("confluent_kafka")
    owner = subprocess.Popen(
        [sys.executable, "-c", KAFKA_OWNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield owner.stdout.readline().strip()
    finally:
        owner.stdin.close()
        owner.wait(30)


def nats_stream(name: str, prefix: str, *, delete: bool = False) -> None:
    nats = pytest.importorskip("nats")

    async def go() -> None:
        nc = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
        try:
            js = nc.jetstream()
            if delete:
                await js.delete_stream(name)
            else:
                await js.add_stream(name=name, subjects=[f"{prefix}.>"], duplicate_window=600.0)
        finally:
            await nc.close()

    asyncio.run(go())


@pytest.fixture
def scenario(
    request, pg_admin_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[crash.Scenario]:
    """The protocol's scenario over fresh databases (and broker stream or topic)."""
    name, big = request.param
    cls = SCENARIOS[name]
    token = uuid.uuid4().hex[:8]
    wanted = {"2pc": ("a", "b", "c"), "3pc": ("a", "b", "c"), "transfer": ("db", "source")}.get(
        name, ("db",)
    )
    databases = {role: f"eos_crash_{role}_{token}" for role in wanted}
    dsns = {
        role: create_database(pg_admin_dsn, db, template=None if role == "source" else template_db)
        for role, db in databases.items()
    }
    rng = random.Random(f"{SEED}/{name}")
    cleanup = []
    try:
        if name in ("2pc", "3pc"):
            prepared_transactions_or_skip(dsns["a"])
        if name == "outbox-nats":
            stream = f"EOSCRASH_{token.upper()}"
            prefix = f"eoscrash.{token}"
            nats_stream(stream, prefix)
            cleanup.append(lambda: nats_stream(stream, prefix, delete=True))

            def nats_sink():
                from eos_airflow.relay import NatsSink

                return NatsSink(NATS_URL, timeout=10)

            built = cls(
                dsns,
                rng,
                big,
                destination=f"nats:{prefix}.orders",
                make_sink=nats_sink,
                broker=stream,
            )
        elif name == "outbox-kafka":
            bootstrap = request.getfixturevalue("kafka_bootstrap")
            topic = f"eoscrash-{token}"

            journal = str(tmp_path_factory.mktemp("kafka") / "committed.jsonl")

            def kafka_sink():
                from tests.messaging.kafka_log import JournaledKafkaSink

                return JournaledKafkaSink(
                    {"bootstrap.servers": bootstrap, "log_level": 0},
                    transactional_id=f"eos-crash-{token}",
                    timeout=10,
                    journal=journal,
                )

            def create_topic(report):
                from tests.messaging.conftest import create_topic

                report({"partitions": create_topic(bootstrap, topic)})

            code, lines = crash.run_child(create_topic)
            assert code == 0, lines
            built = cls(
                dsns, rng, big, destination=f"kafka:{topic}", make_sink=kafka_sink, broker=bootstrap
            )
            built.journal = journal
        elif issubclass(cls, crash_lake._Lake):
            built = cls(dsns, rng, big)
            if cls.storage == "s3":
                s3 = request.getfixturevalue("s3_server")
                built.root = s3.bucket(f"eos-crash-{token}")
                built.iceberg_properties = s3.iceberg_properties()
                built.delta_options = s3.delta_options()
            else:
                built.root = tmp_path_factory.mktemp(name).as_uri()
            cleanup.append(getattr(built, "stop_poller", lambda: None))
        else:
            built = cls(dsns, rng, big)
        built.setup()
        yield built
    finally:
        for undo in cleanup:
            undo()
        finish_prepared(pg_admin_dsn, list(databases.values()))
        for db in databases.values():
            drop_database(pg_admin_dsn, db)


def finish_prepared(admin: str, databases: list[str]) -> None:
    """Roll back what a failed run left prepared (it would block DROP DATABASE)."""
    from tests.conftest import dsn_for

    with psycopg.connect(admin) as conn:
        rows = conn.execute(
            "SELECT gid, database FROM pg_prepared_xacts WHERE database = ANY(%s)", [databases]
        ).fetchall()
    for gid, database in rows:
        with psycopg.connect(dsn_for(admin, database), autocommit=True) as conn:
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


def drive(scenario: crash.Scenario, plan: list[tuple[str, str]]) -> dict[str, object]:
    """Run, recover and check every (step, action) of ``plan``; return the tallies."""
    rng = random.Random(f"{SEED}/{scenario.name}/timing")
    fired: Counter[tuple[str, str]] = Counter()
    keys = 0
    started = time.monotonic()
    for number, (step, action) in enumerate(plan):
        run = scenario.plan(number, step, action)
        body, spec = scenario.faulty(run)
        where = f"EOS_FAULT_SEED={SEED} {scenario.name} run {number}: {spec}"
        try:
            if action == "sleep":
                sleep = float(spec.rsplit(":", 1)[1])
                sleeper = crash.spawn(body, spec)
                # the competitor starts while the sleeper sleeps at its step: once the
                # sleeper reported that the failpoint fired (if it never does, the run
                # counts as not fired)
                if sleeper.wait_for(lambda line: "fired" in line):
                    time.sleep(rng.uniform(0, sleep * 0.5))
                crash.merge_reports(run, *crash.run_child(scenario.competitor(run, sleep)))
                crash.merge_reports(run, *sleeper.wait())
            else:
                crash.merge_reports(run, *crash.run_child(body, spec))
            scenario.recover(run)
            scenario.check(run)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        fired[(step, action)] += run.fired
        keys += len(run.jobs)
    totals = scenario.finish()
    return {
        "runs": len(plan),
        "fired": sum(fired.values()),
        "keys": keys,
        "by_step": fired,
        "seconds": time.monotonic() - started,
        **totals,
    }


def report(scenario: crash.Scenario, tally: dict[str, object]) -> None:
    steps = ", ".join(f"{s}/{a} {n}" for (s, a), n in sorted(tally["by_step"].items()))
    extra = ""
    if "messages" in tally:
        extra = f", {tally['messages']} messages ({tally['broker_copies']} copies at the broker"
        if "aborted_copies" in tally:
            extra += f", {tally['aborted_copies']} in aborted transactions not counted"
        extra += ")"
    if "polls" in tally:
        extra += f", a reader saw {tally['partial']} partial effects in {tally['polls']} polls"
    if "orphans" in tally:
        extra += f", {tally['orphans']} orphan files removed by `lake orphans`"
    print(
        f"\ncrash matrix {scenario.name} (EOS_FAULT_SEED={SEED}): {tally['runs']} runs, "
        f"{tally['fired']} faults fired, {tally['keys']} keys, {tally['duplicates']} "
        f"duplicates, {tally['lost']} lost, {tally['prepared']} prepared left{extra}; "
        f"{tally['seconds']:.1f} s\n  {steps}"
    )
    assert (tally["duplicates"], tally["lost"], tally["prepared"]) == (0, 0, 0), tally
    assert tally.get("partial", 0) == 0, tally


def sample_plan(name: str) -> list[tuple[str, str]]:
    """Every step once; the action rotates so that each protocol meets all three."""
    steps = SCENARIOS[name].steps
    offset = sorted(SCENARIOS).index(name)
    return [(step, ACTIONS[(i + offset) % len(ACTIONS)]) for i, step in enumerate(steps)]


def full_plan(name: str) -> list[tuple[str, str]]:
    """This protocol's share of EOS_CRASH_RUNS, over every step × action, shuffled."""
    total = sum(len(cls.steps) for cls in SCENARIOS.values())
    combos = [(step, action) for step in SCENARIOS[name].steps for action in ACTIONS]
    count = max(len(combos), round(RUNS * len(SCENARIOS[name].steps) / total))
    plan = [combos[i % len(combos)] for i in range(count)]
    random.Random(f"{SEED}/{name}/plan").shuffle(plan)
    return plan


#: Scenarios on the S3 API: their sample runs belong to the heavy tier (moto is slow).
ON_S3 = {"iceberg-s3", "delta-s3"}


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param((name, False), marks=[pytest.mark.slow] if name in ON_S3 else [])
        for name in SCENARIOS
    ],
    indirect=True,
    ids=list(SCENARIOS),
)
def test_every_step_of_every_protocol_survives_its_fault(scenario):
    plan = sample_plan(scenario.name)
    tally = drive(scenario, plan)
    report(scenario, tally)
    assert {step for step, _ in tally["by_step"]} == set(scenario.steps)
    assert tally["fired"] == len(plan), f"some faults did not fire: {tally['by_step']}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario", [(name, True) for name in SCENARIOS], indirect=True, ids=list(SCENARIOS)
)
def test_crash_matrix(scenario):
    plan = full_plan(scenario.name)
    tally = drive(scenario, plan)
    report(scenario, tally)
    assert tally["fired"] >= 0.9 * len(plan), f"too few faults fired: {tally['by_step']}"


def test_a_failed_chunked_incremental_run_resumes_after_a_newer_runs_position(db, monkeypatch):
    """Found by the matrix: run 1 fails after a chunk (its session lock on the source is
    gone), run 2 copies everything new, run 1's retry must not copy its remaining rows again
    (nor move the position back)."""
    from eos_airflow import Ledger, Origin
    from eos_airflow.errors import FailpointError
    from eos_airflow.protocol.incremental import incremental

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE src (id bigserial PRIMARY KEY, v int); "
            "CREATE TABLE dst (id bigint, v int); "
            "INSERT INTO src (v) SELECT generate_series(1, 10)"
        )

    def load(eos):
        return incremental(
            eos,
            lambda: psycopg.connect(db, autocommit=True),
            source_table="src",
            column="id",
            target_table="dst",
            columns=["id", "v"],
            offset_source="table:src",
            chunk_rows=3,
        )

    def origin(run: str) -> Origin:
        return Origin("incr", "copy", run, -1)

    with Ledger(db) as ledger:
        monkeypatch.setenv("EOS_FAILPOINTS", "after_chunk@1=raise")
        with pytest.raises(FailpointError):
            ledger.run("incr/run-1", load, origin=origin("run-1"))
        monkeypatch.delenv("EOS_FAILPOINTS")
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("INSERT INTO src (v) SELECT generate_series(11, 12)")
        second = ledger.run("incr/run-2", load, origin=origin("run-2"))
        assert (second["from"], second["to"]) == (3, 12)
        retry = ledger.run("incr/run-1", load, attempt=2, origin=origin("run-1"))
        assert retry["rows"] == 0
    with psycopg.connect(db) as conn:
        assert [i for (i,) in conn.execute("SELECT id FROM dst ORDER BY id")] == list(range(1, 13))
        assert conn.execute("SELECT position FROM eos.offsets").fetchone() == (12,)
