"""Attempts in forked processes, and the protocols of the crash matrix (test_crash_matrix.py).

Each faulty attempt runs in a child forked from the test process: the child sets
``EOS_FAILPOINTS`` in its own environment and runs the programmatic API (``Ledger``,
``MultiLedger``, ``Relay``, ``transfer``, ``incremental``), so ``exit`` ends a real process
(``os._exit``: its sockets close, PostgreSQL ends its sessions) and nothing leaks into the test
process. Forking instead of starting ``python -c`` saves the import of Airflow, psycopg and the
brokers' clients on every run (seconds each), which is what makes a thousand runs affordable.
Children report each key their caller was told committed, as a JSON line on a pipe, at once:
a child killed later has already reported what it was told.

A :class:`Scenario` knows one protocol: its failpoint steps, how to build a run (keys with
random sizes), how many times a child reaches each step (to aim ``#K``), the attempt, and
what the database must hold once the run is recovered.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from eos_airflow import EosError, Ledger, Origin
from eos_airflow import failpoints as eos_failpoints
from eos_airflow.ledger.chain import verify
from eos_airflow.multiledger import MultiLedger
from eos_airflow.protocol.messages import KAFKA_MSG_ID_HEADER, NATS_MSG_ID_HEADER
from eos_airflow.protocol.transfer import transfer

Report = Callable[[dict[str, Any]], None]


# -- forked children ------------------------------------------------------------------------


@dataclass
class Child:
    pid: int
    fd: int
    data: bytes = b""
    eof: bool = False

    def _read(self, deadline: float) -> bool:
        """Read what the child wrote until ``deadline``; False once the time is up."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if select.select([self.fd], [], [], remaining)[0]:
            chunk = os.read(self.fd, 65536)
            self.data += chunk
            self.eof = not chunk
        return True

    def lines(self) -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for line in self.data.decode().splitlines(keepends=True)
            if line.endswith("\n")
        ]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> bool:
        """Wait until the child reports a line matching ``predicate`` (True), or ends or the
        time is up without one (False); the child goes on either way."""
        deadline = time.monotonic() + timeout
        while not any(predicate(line) for line in self.lines()):
            if self.eof or not self._read(deadline):
                return False
        return True

    def wait(self, timeout: float = 120.0) -> tuple[int, list[dict[str, Any]]]:
        """(exit status, reported lines); a child that hangs is killed and fails the test."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._read(deadline):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                os.close(self.fd)
                raise AssertionError(
                    f"child {self.pid} hung for {timeout} s; it reported {self.data.decode()!r}"
                )
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status), self.lines()


def spawn(body: Callable[[Report], None], failpoints: str | None = None) -> Child:
    """Run ``body(report)`` in a forked child with ``EOS_FAILPOINTS=failpoints``. The child
    reports each failpoint that fires (``{"fired": step, "action": ...}``) the moment it
    fires, through :func:`eos_airflow.failpoints.set_observer`: the evidence that the fault
    happened, written before an ``exit`` ends the child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        code = 0
        try:
            os.close(read)
            if failpoints:
                os.environ["EOS_FAILPOINTS"] = failpoints
            else:
                os.environ.pop("EOS_FAILPOINTS", None)

            def report(line: dict[str, Any]) -> None:
                os.write(write, (json.dumps(line, default=str) + "\n").encode())

            eos_failpoints.set_observer(
                lambda step, action, attempt: report(
                    {"fired": step, "action": action, "attempt": attempt}
                )
            )
            body(report)
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    os.close(write)
    return Child(pid, read)


def run_child(
    body: Callable[[Report], None], failpoints: str | None = None, timeout: float = 120.0
) -> tuple[int, list[dict[str, Any]]]:
    return spawn(body, failpoints).wait(timeout)


# -- runs -----------------------------------------------------------------------------------


@dataclass
class Job:
    key: str
    index: int
    size: int
    every: int | None = None  # chunk size, when the protocol commits in chunks
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    number: int
    step: str  # the failpoint step, prefixed by the phase ("relay.after_send")
    action: str
    jobs: list[Job]
    told: dict[str, Any] = field(default_factory=dict)  # key -> result the caller was told
    fired: bool = False

    @property
    def failpoint(self) -> str:
        return self.step.rsplit(".", 1)[-1]

    def origin(self, job: Job, run_id: str | None = None) -> Origin:
        return Origin("crash", self.step, run_id or f"run-{self.number}", job.index)


def attempt_jobs(
    run: Run,
    report: Report,
    one: Callable[[Job, int, Origin, float], Any],
    attempt: int,
    *,
    run_id: str | None = None,
    wait_timeout: float = 30.0,
    stop_on_error: bool = False,
) -> None:
    """Run every job of ``run`` (in a child); report what each caller was told."""
    for job in run.jobs:
        try:
            result = one(job, attempt, run.origin(job, run_id), wait_timeout)
        except (EosError, psycopg.Error) as exc:
            report({"key": job.key, "error": type(exc).__name__, "message": str(exc)[:300]})
            if stop_on_error:
                return
            continue
        report({"key": job.key, "told": result})


def merge_reports(run: Run, code: int, lines: list[dict[str, Any]]) -> None:
    """Fold a child's reports into ``run``; two callers told different results for one key
    means that two attempts committed it. The fault counts as fired only on the child's own
    evidence (its failpoint observer's report), which must name the run's step and action."""
    for line in lines:
        if "told" in line:
            key = line["key"]
            assert run.told.setdefault(key, line["told"]) == line["told"], (
                f"{key}: one caller was told {run.told[key]}, another {line['told']}"
            )
        elif "fired" in line:
            assert (line["fired"], line["action"].split(":")[0]) == (run.failpoint, run.action), (
                f"failpoint {line} fired in a run that injects {run.action} at {run.step}"
            )
            run.fired = True
    if code == 137:
        assert any(line.get("action") == "exit" for line in lines), (
            f"child ended with status 137 but no exit failpoint fired: {lines}"
        )
    assert code in (0, 137), f"child failed with status {code}: {lines}"


class Scenario:
    """One protocol of the matrix; subclasses fill in the protocol-specific parts."""

    name = ""
    steps: tuple[str, ...] = ()
    #: Does a failed attempt end its child? (2PC: a transaction left in doubt after the
    #: decision holds its row locks until the next try of its key or `recover` finishes it,
    #: so the child's next key, which updates the same rows, would wait for it.)
    stop_on_error = False
    #: Steps reached once per chunk boundary (the others once per key).
    chunk_steps = frozenset({"before_chunk_commit", "after_chunk"})

    def __init__(self, dsns: dict[str, str], rng: random.Random, big: bool) -> None:
        self.dsns = dsns
        self.rng = rng
        self.big = big
        self.keys: list[str] = []
        self.jobs: list[Job] = []

    @property
    def dsn(self) -> str:
        return self.dsns["db"]

    def setup(self) -> None: ...

    def plan(self, number: int, step: str, action: str) -> Run:
        rng = self.rng
        jobs = [
            self.job(f"{self.name}/{number}/{j}", j)
            for j in range(1 if action == "sleep" else rng.randint(1, 4 if self.big else 3))
        ]
        if step.rsplit(".", 1)[-1] in self.chunk_steps and not any(
            self.chunk_hits(job) for job in jobs
        ):
            jobs[0].every = jobs[0].every or rng.randint(1, 8)
            jobs[0].size = jobs[0].every * rng.randint(2, 4)  # at least 2 chunks
        self.keys.extend(job.key for job in jobs)
        self.jobs.extend(jobs)
        return Run(number, step, action, jobs)

    def job(self, key: str, index: int) -> Job:
        size = self.rng.randint(1, 120 if self.big else 30)
        return Job(key, index, size)

    def chunk_size(self, job: Job) -> int:
        """1-8 items per chunk, or (large runs) a size giving 2-12 chunks."""
        if not self.big:
            return self.rng.randint(1, 8)
        return self.rng.randint(max(1, job.size // 12), max(1, job.size // 2))

    def chunk_hits(self, job: Job) -> int:
        return max(0, math.ceil(job.size / job.every) - 1) if job.every else 0

    def hits(self, run: Run) -> int:
        """How often an attempt over every job reaches the run's step."""
        if run.failpoint in self.chunk_steps:
            return sum(self.chunk_hits(job) for job in run.jobs)
        return len(run.jobs)

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        raise NotImplementedError

    def attempt(
        self, run: Run, attempt: int, *, run_id: str | None = None, wait_timeout: float = 30.0
    ) -> Callable[[Report], None]:
        return lambda report: attempt_jobs(
            run,
            report,
            self.one,
            attempt,
            run_id=run_id,
            wait_timeout=wait_timeout,
            stop_on_error=self.stop_on_error,
        )

    def faulty(self, run: Run) -> tuple[Callable[[Report], None], str]:
        """The child that meets the fault, and its EOS_FAILPOINTS."""
        if run.action == "sleep":
            return self.attempt(run, 1), f"{run.failpoint}@1={self.sleep_spec()}"
        nth = self.rng.randint(1, max(1, self.hits(run)))
        return self.attempt(run, 1), f"{run.failpoint}@1#{nth}={run.action}"

    def sleep_spec(self) -> str:
        return f"sleep:{self.sleep_seconds():.2f}"

    def sleep_seconds(self) -> float:
        return self.rng.uniform(0.15, 0.3) if self.big else self.rng.uniform(0.25, 0.4)

    def competitor(self, run: Run, sleep: float) -> Callable[[Report], None]:
        """While the sleeper sleeps: the next try of the same task instance (takes the key
        over: the sleeper is fenced), or another run of the key with a wait shorter than the
        sleep (times out with KeyInProgressError, or skips once the sleeper committed)."""
        if self.rng.random() < 0.5:
            return self.attempt(run, 2)
        return self.attempt(run, 1, run_id=f"other-{run.number}", wait_timeout=sleep / 4)

    def recover(self, run: Run) -> None:
        """After the fault: the next try of every key (and sometimes ``eos-airflow recover``)."""
        if self.rng.random() < (0.25 if not self.big else 0.03):
            self.cli_recover()
        code, lines = run_child(self.attempt(run, 3))
        assert code == 0, lines
        merge_reports(run, code, lines)
        missing = [job.key for job in run.jobs if job.key not in run.told]
        assert not missing, f"the clean retry did not finish {missing}: {lines}"

    def cli_recover(self) -> None:
        import subprocess
        import sys
        from pathlib import Path

        eos = Path(sys.executable).parent / "eos-airflow"
        done = subprocess.run(
            [str(eos), "recover", "--dsn", self.dsn, *self.recover_args()],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "EOS_FAILPOINTS"},
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def recover_args(self) -> list[str]:
        return []

    # -- invariants ------------------------------------------------------------------------
    def check(self, run: Run) -> None:
        """Every key committed exactly once, with the result its callers were told, and the
        target holding exactly what the committed attempt(s) wrote."""
        keys = [job.key for job in run.jobs]
        with psycopg.connect(self.ledger_dsn, autocommit=True) as conn:
            entries = {
                k: (s, r)
                for k, s, r in conn.execute(
                    "SELECT key, state::text, result FROM eos.ledger WHERE key = ANY(%s)", [keys]
                )
            }
            commits = Counter(
                k
                for (k,) in conn.execute(
                    "SELECT key FROM eos.ledger_events WHERE key = ANY(%s) "
                    "AND event IN ('committed', 'replaced')",
                    [keys],
                )
            )
        for key in keys:
            assert entries[key][0] == "committed", f"{key} is {entries[key][0]}, not committed"
            assert commits[key] == 1, f"{key} committed {commits[key]} times"
            assert run.told[key] == entries[key][1], (
                f"{key}: the caller was told {run.told[key]}, the ledger holds {entries[key][1]}"
            )
        self.check_target(run)

    @property
    def ledger_dsn(self) -> str:
        return self.dsn

    def check_target(self, run: Run) -> None:
        raise NotImplementedError

    def target_counts(self) -> tuple[int, int]:
        """(duplicates, lost) in the target over every job of every run: extra copies of a
        written item, and items that should be there and are not."""
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        """Once after every run: the chains verify, nothing left running; counted over every
        key, from the data (the test asserts the counts it prints): duplicates (a second
        commit of a key, or an extra copy in the target), lost (a key never committed, or an
        item missing from the target) and transactions left prepared."""
        out: dict[str, Any] = {"prepared": 0}
        with psycopg.connect(self.ledger_dsn) as conn:
            commits = Counter(
                k
                for (k,) in conn.execute(
                    "SELECT key FROM eos.ledger_events WHERE key = ANY(%s) "
                    "AND event IN ('committed', 'replaced')",
                    [self.keys],
                )
            )
        duplicates, lost = self.target_counts()
        out["duplicates"] = duplicates + sum(n - 1 for n in commits.values() if n > 1)
        out["lost"] = lost + sum(1 for key in self.keys if not commits[key])
        for name, dsn in self.dsns.items():
            with psycopg.connect(dsn, autocommit=True) as conn:
                if conn.execute("SELECT to_regclass('eos.ledger')").fetchone()[0] is None:
                    continue
                checked = verify(conn)
                assert checked.ok, f"{name}: {checked.first_problem}"
                running = conn.execute(
                    "SELECT key, state::text FROM eos.ledger WHERE state <> 'committed'"
                ).fetchall()
                assert not running, f"{name}: keys left unfinished: {running[:5]}"
                out["prepared"] += conn.execute(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = "
                    "current_database() AND gid LIKE 'eos:%'"
                ).fetchone()[0]
                out[name] = conn.execute("SELECT count(*) FROM eos.ledger_events").fetchone()[0]
        return out


# -- single database ------------------------------------------------------------------------


class Local(Scenario):
    """One transaction: the rows and the ledger's commit mark."""

    name = "local"
    steps = ("after_claim", "before_commit", "after_commit")

    def setup(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE rows_t (key text, i int, attempt int)")

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        def fn(eos):
            eos.conn.execute(
                "INSERT INTO rows_t SELECT %s, g, %s FROM generate_series(1, %s) g",
                [eos.key, eos.attempt, job.size],
            )
            return {"rows": job.size, "attempt": eos.attempt}

        with Ledger(self.dsn, wait_timeout=wait_timeout) as ledger:
            return ledger.run(job.key, fn, attempt=attempt, origin=origin)

    def check_target(self, run: Run) -> None:
        with psycopg.connect(self.dsn) as conn:
            for job in run.jobs:
                rows = conn.execute(
                    "SELECT i, attempt FROM rows_t WHERE key = %s ORDER BY i", [job.key]
                ).fetchall()
                committed = run.told[job.key]["attempt"]
                assert rows == [(i, committed) for i in range(1, job.size + 1)], (
                    f"{job.key}: rows {rows[:5]}... are not rows 1..{job.size} of attempt "
                    f"{committed} (duplicates or partial writes)"
                )

    def target_counts(self) -> tuple[int, int]:
        with psycopg.connect(self.dsn) as conn:
            found = dict(
                ((k, i), n)
                for k, i, n in conn.execute("SELECT key, i, count(*) FROM rows_t GROUP BY key, i")
            )
        want = {(job.key, i) for job in self.jobs for i in range(1, job.size + 1)}
        return (sum(n - 1 for n in found.values()) + len(set(found) - want), len(want - set(found)))


class Chunked(Local):
    """``eos.checkpoints``: each chunk commits with a recovery point; a retry resumes."""

    name = "chunked"
    steps = ("after_claim", "before_chunk_commit", "after_chunk", "before_commit", "after_commit")

    def job(self, key: str, index: int) -> Job:
        job = super().job(key, index)
        job.every = self.chunk_size(job)
        return job

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        def fn(eos):
            chunks = eos.checkpoints(range(1, job.size + 1), every=job.every)
            for chunk in chunks:
                eos.conn.cursor().executemany(
                    "INSERT INTO rows_t VALUES (%s, %s, %s)",
                    [(eos.key, i, eos.attempt) for i in chunk],
                )
            return {"rows": chunks.rows, "chunks": chunks.chunks}

        with Ledger(self.dsn, wait_timeout=wait_timeout) as ledger:
            return ledger.run(job.key, fn, attempt=attempt, origin=origin)

    def check_target(self, run: Run) -> None:
        with psycopg.connect(self.dsn) as conn:
            for job in run.jobs:
                rows = [
                    i
                    for (i,) in conn.execute(
                        "SELECT i FROM rows_t WHERE key = %s ORDER BY i", [job.key]
                    )
                ]
                assert rows == list(range(1, job.size + 1)), (
                    f"{job.key}: chunks of {job.every}: rows {rows} are not 1..{job.size} once"
                )
                assert run.told[job.key]["rows"] == job.size


class Incremental(Scenario):
    """``incremental()`` (IncrementalTableOperator's core): new source rows past the position
    in ``eos.offsets``, copied with the position advanced in the same transaction."""

    name = "incremental"
    steps = ("after_claim", "before_chunk_commit", "after_chunk", "before_commit", "after_commit")

    def setup(self) -> None:
        import eos_airflow.operators.incremental  # noqa: F401  (imports Airflow: once, here)

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE src (id bigserial PRIMARY KEY, v int); "
                "CREATE TABLE dst (id bigint, v int)"
            )

    def job(self, key: str, index: int) -> Job:
        job = super().job(key, index)
        job.every = self.rng.choice([None, self.chunk_size(job)])
        return job

    def plan(self, number: int, step: str, action: str) -> Run:
        run = super().plan(number, step, action)
        if action == "sleep":  # the competitor may start first: the rows must exist by then
            for job in run.jobs:
                self.add_source_rows(job)
                job.extra["added"] = True
        return run

    def add_source_rows(self, job: Job) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO src (v) SELECT g FROM generate_series(1, %s) g", [job.size])

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        from eos_airflow.protocol.incremental import incremental

        if attempt == 1 and origin.run_id.startswith("run-") and not job.extra.get("added"):
            self.add_source_rows(job)  # new source rows per key, just before its first try

        def connect() -> psycopg.Connection[Any]:
            return psycopg.connect(self.dsn, autocommit=True)

        with Ledger(self.dsn, wait_timeout=wait_timeout) as ledger:
            return ledger.run(
                job.key,
                lambda eos: incremental(
                    eos,
                    connect,
                    source_table="src",
                    column="id",
                    target_table="dst",
                    columns=["id", "v"],
                    offset_source="table:src",
                    chunk_rows=job.every,
                ),
                attempt=attempt,
                origin=origin,
            )

    def check_target(self, run: Run) -> None:
        """Once the run is recovered, every source row is in the target exactly once: each
        key's rows were added before its first try, and every key has committed since (the
        last commit copied whatever was still past the position). The ledger's own position
        is not trusted: a run that never advances and copies nothing must fail here."""
        with psycopg.connect(self.dsn) as conn:
            source = {i for (i,) in conn.execute("SELECT id FROM src")}
            dst = Counter(i for (i,) in conn.execute("SELECT id FROM dst"))
            position = conn.execute(
                "SELECT position FROM eos.offsets WHERE source = 'table:src'"
            ).fetchone()
        twice = sorted(i for i, n in dst.items() if n > 1)
        assert not twice, f"source rows copied more than once: {twice[:10]}"
        lost, unknown = sorted(source - set(dst)), sorted(set(dst) - source)
        assert not lost and not unknown, (
            f"{len(lost)} source rows never copied {lost[:10]}, {len(unknown)} copied rows "
            f"not in the source {unknown[:10]} (position {position})"
        )
        assert position is not None and position[0] == max(source), (
            f"position {position} is not the largest source id {max(source)}"
        )

    def target_counts(self) -> tuple[int, int]:
        with psycopg.connect(self.dsn) as conn:
            source = {i for (i,) in conn.execute("SELECT id FROM src")}
            dst = Counter(i for (i,) in conn.execute("SELECT id FROM dst"))
        return (sum(n - 1 for n in dst.values()) + len(set(dst) - source), len(source - set(dst)))


class Transfer(Scenario):
    """``transfer()`` (ExactlyOnceTransferOperator's core): COPY between databases, whole or
    in chunks, append or replace (atomic: staged, then published)."""

    name = "transfer"
    steps = ("after_claim", "before_chunk_commit", "after_chunk", "before_commit", "after_commit")

    def setup(self) -> None:
        with psycopg.connect(self.dsns["source"], autocommit=True) as conn:
            conn.execute("CREATE TABLE tsrc (grp int, i int, v text)")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE tdst (grp int, i int, v text)")

    def job(self, key: str, index: int) -> Job:
        job = super().job(key, index)
        job.every = self.rng.choice([None, self.chunk_size(job)])
        job.extra = {"grp": len(self.keys) + index, "mode": self.rng.choice(["append", "replace"])}
        text = "tab\there, line\nbreak, quote ' \" \\ é ✓"
        with psycopg.connect(self.dsns["source"], autocommit=True) as conn:
            conn.execute(
                "INSERT INTO tsrc SELECT %s, g, %s || g FROM generate_series(1, %s) g",
                [job.extra["grp"], text, 400],
            )
        if job.extra["mode"] == "replace":  # an old partition that the load replaces
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO tdst VALUES (%s, -1, 'old')", [job.extra["grp"]])
        return job

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        def source() -> psycopg.Connection[Any]:
            return psycopg.connect(self.dsns["source"], autocommit=True)

        grp = job.extra["grp"]
        with Ledger(self.dsn, wait_timeout=wait_timeout) as ledger:
            return ledger.run(
                job.key,
                lambda eos: transfer(
                    eos,
                    source,
                    query="SELECT grp, i, v FROM tsrc WHERE grp = %s AND i <= %s ORDER BY i",
                    parameters=[grp, job.size],
                    table="tdst",
                    mode=job.extra["mode"],
                    replace_where="grp = %s AND i <= %s"
                    if job.extra["mode"] == "replace"
                    else None,
                    chunk_rows=job.every,
                ),
                attempt=attempt,
                origin=origin,
            )

    def check_target(self, run: Run) -> None:
        with psycopg.connect(self.dsns["source"]) as src, psycopg.connect(self.dsn) as dst:
            for job in run.jobs:
                grp = job.extra["grp"]
                want = src.execute(
                    "SELECT i, v FROM tsrc WHERE grp = %s AND i <= %s ORDER BY i", [grp, job.size]
                ).fetchall()
                got = dst.execute(
                    "SELECT i, v FROM tdst WHERE grp = %s ORDER BY i", [grp]
                ).fetchall()
                assert got == want, (
                    f"{job.key} ({job.extra['mode']}, chunks of {job.every}):"
                    f" {len(got)} rows, expected {len(want)} once"
                )
                assert run.told[job.key]["rows"] == job.size
            staging = dst.execute(
                "SELECT relname FROM pg_class WHERE relname LIKE 'eos\\_stage\\_%'"
            ).fetchall()
            assert not staging, f"staging tables left: {staging}"

    def target_counts(self) -> tuple[int, int]:
        with psycopg.connect(self.dsn) as conn:
            found = dict(
                ((g, i), n)
                for g, i, n in conn.execute("SELECT grp, i, count(*) FROM tdst GROUP BY grp, i")
            )
        want = {(job.extra["grp"], i) for job in self.jobs for i in range(1, job.size + 1)}
        return (sum(n - 1 for n in found.values()) + len(set(found) - want), len(want - set(found)))


# -- several databases ----------------------------------------------------------------------


class TwoPhase(Scenario):
    """``MultiLedger`` across banks ``a`` and ``b``, coordinated by the ledger of ``c``:
    each key moves its size from ``a`` to ``b`` and logs it on both."""

    name = "2pc"
    protocol = "2pc"
    stop_on_error = True
    steps = (
        "after_claim",
        "before_commit",
        "after_prepare",
        "after_decision",
        "after_first_commit_prepared",
        "after_commit",
    )
    START = 1_000_000

    def setup(self) -> None:
        for name in ("a", "b"):
            with psycopg.connect(self.dsns[name], autocommit=True) as conn:
                conn.execute(
                    "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint); "
                    "CREATE TABLE tlog (key text, amount int)"
                )
                conn.execute("INSERT INTO accounts VALUES (1, %s)", [self.START])

    @property
    def ledger_dsn(self) -> str:
        return self.dsns["c"]

    @property
    def dsn(self) -> str:
        return self.dsns["c"]

    def multi(self, wait_timeout: float = 30.0) -> MultiLedger:
        return MultiLedger(
            self.dsns["c"],
            {"a": self.dsns["a"], "b": self.dsns["b"]},
            protocol=self.protocol,
            wait_timeout=wait_timeout,
        )

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        def fn(eos):
            for name, sign in (("a", -1), ("b", 1)):
                eos.conns[name].execute(
                    "UPDATE accounts SET balance = balance + %s", [sign * job.size]
                )
                eos.conns[name].execute(
                    "INSERT INTO tlog VALUES (%s, %s)", [eos.key, sign * job.size]
                )
            return {"amount": job.size, "attempt": eos.attempt}

        with self.multi(wait_timeout) as banks:
            return banks.run(job.key, fn, attempt=attempt, origin=origin)

    def recover(self, run: Run) -> None:
        how = self.rng.random()
        if how < (0.3 if not self.big else 0.03):
            self.cli_recover()
        elif how < 0.5:

            def recover(report: Report) -> None:
                with self.multi() as banks:
                    report({"resolved": [r.outcome for r in banks.recover(grace=0)]})

            code, lines = run_child(recover)
            assert code == 0, lines
        super().recover(run)

    def recover_args(self) -> list[str]:
        return [
            "--grace",
            "0",
            "--participant",
            f"a={self.dsns['a']}",
            "--participant",
            f"b={self.dsns['b']}",
        ]

    def check_target(self, run: Run) -> None:
        for name, sign in (("a", -1), ("b", 1)):
            with psycopg.connect(self.dsns[name]) as conn:
                prepared = conn.execute(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = "
                    "current_database() AND gid LIKE 'eos:%'"
                ).fetchall()
                assert not prepared, f"{name}: left prepared after recovery: {prepared}"
                for job in run.jobs:
                    rows = conn.execute(
                        "SELECT amount FROM tlog WHERE key = %s", [job.key]
                    ).fetchall()
                    assert rows == [(sign * job.size,)], f"{job.key} on {name}: {rows}"
                    assert run.told[job.key]["amount"] == job.size

    def target_counts(self) -> tuple[int, int]:
        duplicates = lost = 0
        want = {job.key: job.size for job in self.jobs}
        for name, sign in (("a", -1), ("b", 1)):
            with psycopg.connect(self.dsns[name]) as conn:
                found = Counter(conn.execute("SELECT key, amount FROM tlog").fetchall())
            duplicates += sum(n - 1 for n in found.values()) + sum(
                1 for key, amount in found if want.get(key) != sign * amount
            )
            lost += sum(1 for key, size in want.items() if (key, sign * size) not in found)
        return duplicates, lost

    def finish(self) -> dict[str, Any]:
        out = super().finish()
        balances = []
        for name in ("a", "b"):
            with psycopg.connect(self.dsns[name]) as conn:
                balances.append(conn.execute("SELECT balance FROM accounts").fetchone()[0])
                moved = conn.execute("SELECT coalesce(sum(amount), 0) FROM tlog").fetchone()[0]
                assert balances[-1] == self.START + moved, f"{name}: balance and log disagree"
        assert sum(balances) == 2 * self.START, f"money created or lost: {balances}"
        return out


class ThreePhase(TwoPhase):
    name = "3pc"
    protocol = "3pc"
    steps = (*TwoPhase.steps[:3], "after_precommit", *TwoPhase.steps[3:])


# -- the transactional outbox and its relay --------------------------------------------------


class Outbox(Scenario):
    """Effects that ``eos.publish`` (the message rows commit with the effect), then the relay
    to a broker (``relay.*`` steps: the relay's own failpoints)."""

    name = "outbox"
    scheme = "nats"
    #: Does the broker drop a re-sent id (JetStream's duplicate window)? Kafka keeps the copy
    #: of a batch re-sent after a crash (consumers drop it by id): only counted, not a fault.
    broker_dedupes = True
    steps = (
        "after_claim",
        "before_commit",
        "after_commit",
        "relay.after_send",
        "relay.before_commit",
        "relay.after_commit",
    )

    def __init__(
        self,
        dsns: dict[str, str],
        rng: random.Random,
        big: bool,
        *,
        destination: str,
        make_sink: Callable[[], Any],
        broker: str,
    ) -> None:
        super().__init__(dsns, rng, big)
        self.destination = destination
        self.make_sink = make_sink
        self.broker = broker  # the JetStream stream, or the Kafka bootstrap servers
        self.batch = 1

    def setup(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE ob_t (key text, messages int)")

    def job(self, key: str, index: int) -> Job:
        return Job(key, index, self.rng.randint(1, 8))

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        def fn(eos):
            eos.conn.execute("INSERT INTO ob_t VALUES (%s, %s)", [eos.key, job.size])
            for n in range(job.size):
                eos.publish(self.destination, {"key": eos.key, "n": n}, key=eos.key)
            return {"messages": job.size, "attempt": eos.attempt}

        with Ledger(self.dsn, wait_timeout=wait_timeout) as ledger:
            return ledger.run(job.key, fn, attempt=attempt, origin=origin)

    def relay(self, attempt: int | None = None) -> Callable[[Report], None]:
        def body(report: Report) -> None:
            from eos_airflow.relay import Relay

            sink = self.make_sink()
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    stats = Relay(
                        conn,
                        {self.scheme: sink},
                        relay_id="eos-crash",
                        batch_size=self.batch,
                        attempt=attempt,
                    ).drain()
                report({"relayed": stats.as_dict()})
            except (EosError, psycopg.Error) as exc:
                report({"error": type(exc).__name__, "message": str(exc)[:300]})
            finally:
                sink.close()

        return body

    def plan(self, number: int, step: str, action: str) -> Run:
        run = super().plan(number, step, action)
        self.batch = self.rng.randint(1, 6)
        if step.startswith("relay."):  # the effects commit first; the relay meets the fault
            code, lines = run_child(self.attempt(run, 1))
            merge_reports(run, code, lines)
        return run

    def hits(self, run: Run) -> int:
        if run.step.startswith("relay."):
            return math.ceil(sum(job.size for job in run.jobs) / self.batch)
        return super().hits(run)

    def faulty(self, run: Run) -> tuple[Callable[[Report], None], str]:
        body, spec = super().faulty(run)
        return (self.relay(attempt=1) if run.step.startswith("relay.") else body), spec

    def competitor(self, run: Run, sleep: float) -> Callable[[Report], None]:
        if run.step.startswith("relay."):
            return self.relay()  # another relay: skips the sleeper's locked rows
        return super().competitor(run, sleep)

    def recover(self, run: Run) -> None:
        """The effects' next try; the relay again after a relay fault (after an effect fault
        the messages wait for :meth:`finish`, which drains the outbox once)."""
        if not run.step.startswith("relay."):
            super().recover(run)
            return
        self.drain()

    def drain(self) -> None:
        code, lines = run_child(self.relay())
        assert code == 0 and "relayed" in lines[-1], lines

    def check_target(self, run: Run) -> None:
        keys = [job.key for job in run.jobs]
        with psycopg.connect(self.dsn) as conn:
            rows = dict(
                conn.execute(
                    "SELECT key, messages FROM ob_t WHERE key = ANY(%s)", [keys]
                ).fetchall()
            )
            assert len(rows) == len(keys)
            queued = Counter(
                k
                for (k,) in conn.execute(
                    "SELECT effect_key FROM eos.outbox WHERE effect_key = ANY(%s)", [keys]
                )
            )
            undelivered = conn.execute(
                "SELECT count(*) FROM eos.outbox WHERE delivered_at IS "
                "NULL AND effect_key = ANY(%s)",
                [keys],
            ).fetchone()[0]
        for job in run.jobs:
            assert rows[job.key] == queued[job.key] == job.size, (job.key, rows, queued)
        if run.step.startswith("relay."):
            assert undelivered == 0, f"{undelivered} messages left undelivered"

    def received(self) -> list[str]:
        """Message ids the broker holds, one per copy."""
        raise NotImplementedError

    def target_counts(self) -> tuple[int, int]:
        """The effects' rows and queued messages (the broker is counted in :meth:`finish`)."""
        with psycopg.connect(self.dsn) as conn:
            rows = Counter(k for (k,) in conn.execute("SELECT key FROM ob_t"))
            queued = Counter(k for (k,) in conn.execute("SELECT effect_key FROM eos.outbox"))
        duplicates = sum(n - 1 for n in rows.values()) + sum(
            max(0, queued[job.key] - job.size) for job in self.jobs
        )
        lost = sum(1 for job in self.jobs if not rows[job.key]) + sum(
            max(0, job.size - queued[job.key]) for job in self.jobs
        )
        return duplicates, lost

    def finish(self) -> dict[str, Any]:
        out = super().finish()
        self.drain()
        with psycopg.connect(self.dsn) as conn:
            ids = {str(i) for (i,) in conn.execute("SELECT message_id FROM eos.outbox")}
            assert (
                conn.execute(
                    "SELECT count(*) FROM eos.outbox WHERE delivered_at IS NULL"
                ).fetchone()[0]
                == 0
            ), "messages left undelivered"
        copies = Counter(self.received())
        out["lost"] += len(ids - set(copies))
        out["duplicates"] += len(set(copies) - ids)  # unknown ids at the broker
        if self.broker_dedupes:  # a second copy of one id is a duplicate
            out["duplicates"] += sum(n - 1 for n in copies.values())
        out["messages"] = len(ids)
        out["broker_copies"] = sum(copies.values())
        if hasattr(self, "aborted_copies"):
            out["aborted_copies"] = self.aborted_copies
        return out


class OutboxNats(Outbox):
    """Relay to NATS JetStream: the stream's duplicate window drops a re-sent message id, so
    the stream must hold each message exactly once."""

    name = "outbox-nats"

    def received(self) -> list[str]:
        from tests.messaging.conftest import nats_received

        stream = self.broker

        def read(report: Report) -> None:
            report(
                {
                    "ids": [
                        h.get(NATS_MSG_ID_HEADER)
                        for _, _, h in nats_received(
                            stream, f"{self.destination[5:].rsplit('.', 1)[0]}.>"
                        )
                    ]
                }
            )

        code, lines = run_child(read)
        assert code == 0, lines
        return lines[0]["ids"]


class OutboxKafka(Outbox):
    """Relay to Kafka in producer transactions: a crash after the Kafka commit and before the
    rows are marked re-sends the batch (consumers drop it by ``eos-message-id``), so copies may
    exceed messages but every id must arrive."""

    name = "outbox-kafka"
    scheme = "kafka"
    broker_dedupes = False

    #: The journal of the relay's committed producer transactions (tests/messaging/kafka_log.py).
    journal = ""

    def received(self) -> list[str]:
        """Ids of the copies a read_committed consumer gets: records of aborted or unfinished
        producer transactions do not count as delivered (see kafka_log: the mock cluster
        cannot hide them, so the relay's producer journals what it committed)."""
        from tests.messaging.kafka_log import committed_messages

        bootstrap, topic = self.broker, self.destination[6:]

        def read(report: Report) -> None:
            kept, aborted = committed_messages(bootstrap, topic, self.journal)
            report(
                {
                    "ids": [dict(m.headers())[KAFKA_MSG_ID_HEADER].decode() for m in kept],
                    "aborted": aborted,
                }
            )

        code, lines = run_child(read)
        assert code == 0, lines
        self.aborted_copies = lines[0]["aborted"]
        return lines[0]["ids"]
