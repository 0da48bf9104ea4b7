"""Heavy fault runs (``EOS_SLOW=1``): many batches, a process killed at a random step of
random batches, until everything is through. Size: ``EOS_SLOW_MESSAGES`` (default 3000)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import psycopg
import pytest

from eos_airflow import Ledger
from eos_airflow.failpoints import EXIT_CODE
from eos_airflow.protocol.messages import NATS_MSG_ID_HEADER
from tests.conftest import ROOT
from tests.messaging.conftest import NATS_URL, nats_received, produce_json

pytestmark = pytest.mark.slow

N = int(os.environ.get("EOS_SLOW_MESSAGES", "3000"))
SEED = int(os.environ.get("EOS_SLOW_SEED", "7"))

INGEST = """
import json, os
from eos_airflow import Ledger
from eos_airflow.protocol.ingest import ingest_batch, table_writer
s = json.loads(os.environ["SPEC"])
with Ledger(s["dsn"]) as ledger:
    print(json.dumps(ledger.run(s["key"], lambda eos: ingest_batch(
        eos, {"bootstrap.servers": s["bootstrap"], "log_level": 0}, [s["topic"]],
        write=table_writer("readings"), max_messages=s["batch"], poll_timeout=2.0))))
"""

RELAY = """
import json, os, psycopg
from eos_airflow.relay import NatsSink, Relay
s = json.loads(os.environ["SPEC"])
sink = NatsSink(s["nats"])
with psycopg.connect(s["dsn"], autocommit=True) as conn:
    print(json.dumps(Relay(conn, {"nats": sink}, batch_size=s["batch"]).drain().as_dict()))
"""


def child(code: str, spec: dict, failpoints: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPEC": json.dumps(spec)}
    env.pop("EOS_FAILPOINTS", None)
    if failpoints:
        env["EOS_FAILPOINTS"] = failpoints
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_ingest_killed_at_random_steps_loads_every_message_once(db, kafka_bootstrap, kafka_topic):
    rng = random.Random(SEED)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE readings (device text, seq int, value float8)")
    produce_json(
        kafka_bootstrap,
        kafka_topic,
        [{"device": f"d{i % 7}", "seq": i, "value": i / 2} for i in range(N)],
        partitions=4,
    )
    steps = ["after_claim", "after_poll", "before_commit", "after_commit", None, None]
    crashes = 0
    for run in range(10 * N // 250 + 20):
        step = rng.choice(steps)
        done = child(
            INGEST,
            {
                "dsn": db,
                "key": f"ingest/{run}",
                "topic": kafka_topic,
                "bootstrap": kafka_bootstrap,
                "batch": 250,
            },
            f"{step}=exit" if step else None,
        )
        if step and step != "after_commit" or done.returncode == EXIT_CODE:
            assert done.returncode == EXIT_CODE, done.stderr[-2000:]
            crashes += 1
            continue
        assert done.returncode == 0, done.stderr[-2000:]
        if json.loads(done.stdout)["messages"] == 0:
            break
    else:
        pytest.fail("the ingest did not finish")
    with psycopg.connect(db) as conn:
        seqs = [s for (s,) in conn.execute("SELECT seq FROM readings ORDER BY seq")]
        positions = dict(conn.execute("SELECT source, position::bigint FROM eos.offsets"))
    assert seqs == list(range(N))
    assert positions == {f"kafka:{kafka_topic}/{p}": len(range(p, N, 4)) - 1 for p in range(4)}
    assert crashes > 0


def test_relay_killed_at_random_batches_delivers_every_message_once(db, nats_stream):
    stream, prefix = nats_stream
    rng = random.Random(SEED)
    with Ledger(db) as ledger:
        for e in range(0, N, 500):
            ledger.run(
                f"alerts/{e}",
                lambda eos, e=e: (
                    [eos.publish(f"nats:{prefix}.a", {"n": e + i}) for i in range(min(500, N - e))]
                    and {}
                ),
            )
    for _ in range(50):
        step = rng.choice(["after_send", "before_commit", "after_commit"])
        done = child(
            RELAY, {"dsn": db, "nats": NATS_URL, "batch": 100}, f"{step}#{rng.randint(1, 5)}=exit"
        )
        if done.returncode == 0:
            break
        assert done.returncode == EXIT_CODE, done.stderr[-2000:]
    else:
        pytest.fail("the relay did not finish")
    with psycopg.connect(db) as conn:
        ids = [
            i
            for (i,) in conn.execute(
                "SELECT message_id::text FROM eos.outbox WHERE delivered_at IS NOT NULL ORDER BY id"
            )
        ]
    assert len(ids) == N
    got = [h[NATS_MSG_ID_HEADER] for _, _, h in nats_received(stream, f"{prefix}.>")]
    assert Counter(got) == Counter(ids) and got == ids
