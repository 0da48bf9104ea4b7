"""Faces tier: Airflow's docker-compose topology as native processes, for tests, the demo and local
work.

``docker-compose.yml`` runs api-server, scheduler, dag-processor, triggerer and Celery workers
in containers. :class:`AirflowStack` starts the same processes from the installed packages on
this machine — with the LocalExecutor, or the CeleryExecutor and N workers on a Redis broker —
against a PostgreSQL metadata database, and stops them cleanly (SIGTERM, then SIGKILL after a
grace period). It also gives the handles a fault test needs: the processes running task
instances, killing a worker, restarting the scheduler, and the states of a DAG run.

.. code-block:: python

    with AirflowStack(home, metadata_url, dags_folder, executor="celery", workers=2) as stack:
        run_id = stack.trigger("eos_e2e_mapped")
        stack.wait_for_run("eos_e2e_mapped", run_id, timeout=600)

The metadata database is read directly (plain SQL) for run and task states: the stack is an
operator's tool outside Airflow's tasks, like ``airflow`` CLI commands are.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import psycopg

from eos_airflow.errors import ConfigurationError

#: Executors the stack can run, by the short name used on the command line.
EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
#: The task runner's process title: ``airflow worker -- <task instance id>`` (Task SDK).
_TASK_TITLE = re.compile(r"^airflow worker -- ([0-9a-f]{8}-[0-9a-f-]{27})\b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _airflow_bin() -> str:
    candidate = Path(sys.executable).parent / "airflow"
    return str(candidate) if candidate.exists() else "airflow"


@dataclass
class TaskProcess:
    """A running try of a task instance: its supervisor and the task runner it forked."""

    ti_id: str
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int
    runner: psutil.Process
    supervisor: psutil.Process | None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the runner and its supervisor (a worker slot dies or freezes whole)."""
        for proc in (self.supervisor, self.runner):
            if proc is not None:
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass


class AirflowStack:
    """api-server, scheduler, dag-processor, triggerer (+ Celery workers) as local processes."""

    def __init__(
        self,
        home: Path | str,
        metadata_url: str,
        dags_folder: Path | str,
        *,
        executor: str = "local",
        workers: int = 2,
        broker_url: str = "redis://127.0.0.1:6379/0",
        parallelism: int = 4,
        env: Mapping[str, str] | None = None,
        log_dir: Path | str | None = None,
        port: int | None = None,
    ) -> None:
        if executor not in EXECUTORS:
            raise ConfigurationError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}")
        if not metadata_url.startswith("postgresql"):
            raise ConfigurationError(
                "the stack needs a PostgreSQL metadata database (postgresql+psycopg://...), "
                f"got {metadata_url.split(':', 1)[0]!r}"
            )
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.metadata_url = metadata_url
        self.executor = executor
        self.workers = workers
        self.port = port or free_port()
        self.log_dir = Path(log_dir) if log_dir else self.home / "stack-logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._restarts: dict[str, int] = {}
        # failpoints reach the stack only when asked for in ``env``, never by inheritance
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "EOS_FAILPOINTS"},
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": EXECUTORS[executor],
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}",
            "AIRFLOW__API_AUTH__JWT_SECRET": os.environ.get(
                "AIRFLOW__API_AUTH__JWT_SECRET", "eos-stack-secret"
            ),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_url,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(max(1, parallelism // max(1, workers))),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.update(env or {})

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> AirflowStack:
        return self if self._procs else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def components(self) -> list[str]:
        names = ["api-server", "scheduler", "dag-processor", "triggerer"]
        if self.executor == "celery":
            names += [f"worker-{i}" for i in range(1, self.workers + 1)]
        return names

    def _command(self, name: str) -> list[str]:
        if name == "api-server":
            return [_airflow_bin(), "api-server", "--port", str(self.port)]
        if name.startswith("worker-"):
            # one queue, its own hostname so that each worker is a separate Celery node
            return [
                _airflow_bin(),
                "celery",
                "worker",
                "--celery-hostname",
                f"{name}@%h",
                "--concurrency",
                self.env["AIRFLOW__CELERY__WORKER_CONCURRENCY"],
                "--skip-serve-logs",
            ]
        return [_airflow_bin(), name]

    def migrate(self) -> None:
        """``airflow db migrate`` on the metadata database (a few seconds when it is new)."""
        done = self.cli("db", "migrate", timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{done.stdout}{done.stderr}")

    def start(
        self, *, migrate: bool = True, wait_for_dags: Iterable[str] = (), timeout: float = 240
    ) -> AirflowStack:
        """Start every component; wait until the api-server answers and ``wait_for_dags``
        are parsed."""
        if migrate:
            self.migrate()
        try:
            for name in self.components():
                self.start_component(name)
            dags = list(wait_for_dags)

            # a component that exits while we wait fails the start at once (check_alive raises)
            def api_up() -> bool:
                self.check_alive()
                return self._api_up()

            def dags_parsed() -> bool:
                self.check_alive()
                return set(dags) <= self.parsed_dags()

            self.wait_until(api_up, timeout, "the api-server to answer")
            if dags:
                self.wait_until(dags_parsed, timeout, f"DAGs {', '.join(dags)} to be parsed")
        except BaseException:
            self.stop()
            raise
        return self

    def start_component(self, name: str) -> None:
        restarts = self._restarts.get(name, 0)
        suffix = f".{restarts}" if restarts else ""
        log = open(self.log_dir / f"{name}{suffix}.log", "wb")  # noqa: SIM115
        self._logs[name] = log
        # own process group: stopping a component reaches its children (Celery's pool,
        # LocalExecutor's workers, gunicorn's workers) and never this process
        self._procs[name] = subprocess.Popen(
            self._command(name),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_component(self, name: str, *, sig: int = signal.SIGTERM, grace: float = 30) -> None:
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        try:  # descendants that left the process group (setsid) are stopped one by one
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        _signal_group(proc, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=30)
        _signal_group(proc, signal.SIGKILL)  # children that outlived their parent
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        log = self._logs.pop(name, None)
        if log:
            log.close()

    def restart_component(self, name: str, *, sig: int = signal.SIGTERM) -> None:
        self.stop_component(name, sig=sig)
        self._restarts[name] = self._restarts.get(name, 0) + 1
        self.start_component(name)

    def kill_worker(self, name: str) -> None:
        """SIGKILL a Celery worker with every task it runs (a machine lost), then start a
        fresh worker under the same name."""
        self.restart_component(name, sig=signal.SIGKILL)

    def stop(self) -> None:
        for name in reversed(list(self._procs)):
            self.stop_component(name)

    def running(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self._procs.items()}

    def check_alive(self) -> None:
        """Raise, with the end of its log, when a component has exited on its own."""
        for name, alive in self.running().items():
            if not alive:
                log = self.log_dir / f"{name}.log"
                restarts = self._restarts.get(name, 0)
                if restarts:
                    log = self.log_dir / f"{name}.{restarts}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(
                    f"Airflow {name} exited ({self._procs[name].returncode}):\n{tail}"
                )

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path.name}\n{text[-chars:]}")
        return "\n".join(out)

    # --- Airflow ---------------------------------------------------------------------------

    def cli(self, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_airflow_bin(), *argv], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def _api_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def metadata(self) -> psycopg.Connection[Any]:
        dsn = re.sub(r"^postgresql\+\w+://", "postgresql://", self.metadata_url)
        return psycopg.connect(dsn, autocommit=True)

    def parsed_dags(self) -> set[str]:
        try:
            with self.metadata() as conn:
                return {
                    r[0] for r in conn.execute("SELECT dag_id FROM dag WHERE is_stale IS NOT TRUE")
                }
        except psycopg.Error:
            return set()

    def trigger(self, dag_id: str, logical_date: str | None = None, conf: str | None = None) -> str:
        run_id = f"stack__{dag_id}__{int(time.time() * 1000)}"
        argv = ["dags", "trigger", dag_id, "--run-id", run_id]
        if logical_date:
            argv += ["--logical-date", logical_date]
        if conf:
            argv += ["--conf", conf]
        done = self.cli(*argv)
        if done.returncode != 0:
            raise RuntimeError(f"airflow dags trigger {dag_id} failed:\n{done.stderr}")
        return run_id

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        with self.metadata() as conn:
            row = conn.execute(
                "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", [dag_id, run_id]
            ).fetchone()
        return row[0] if row else None

    def task_states(self, dag_id: str, run_id: str) -> dict[tuple[str, int], tuple[str, int]]:
        """``{(task_id, map_index): (state, try_number)}`` of one DAG run."""
        with self.metadata() as conn:
            rows = conn.execute(
                "SELECT task_id, map_index, state, try_number FROM task_instance "
                "WHERE dag_id = %s AND run_id = %s",
                [dag_id, run_id],
            ).fetchall()
        return {(t, m): (s, n) for t, m, s, n in rows}

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float = 600,
        on_tick: Callable[[], None] | None = None,
    ) -> str:
        """Wait until the run is finished; return its state (``success`` or ``failed``)."""
        state: str | None = None

        def finished() -> bool:
            nonlocal state
            self.check_alive()
            if on_tick:
                on_tick()
            state = self.run_state(dag_id, run_id)
            return state in ("success", "failed")

        self.wait_until(finished, timeout, f"DAG run {run_id} to finish", interval=1)
        assert state is not None
        return state

    def task_processes(self, dag_id: str | None = None) -> list[TaskProcess]:
        """The task runner processes alive now, with the task instance each one runs."""
        runners: dict[str, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            match = _TASK_TITLE.match(cmdline)
            if match:
                runners[match.group(1)] = proc
        if not runners:
            return []
        with self.metadata() as conn:
            rows = conn.execute(
                "SELECT id::text, dag_id, task_id, run_id, map_index, try_number "
                "FROM task_instance WHERE id::text = ANY(%s)",
                [list(runners)],
            ).fetchall()
        found = []
        for ti_id, dag, task, run, index, try_number in rows:
            if dag_id is not None and dag != dag_id:
                continue
            runner = runners[ti_id]
            try:
                supervisor: psutil.Process | None = runner.parent()
            except psutil.NoSuchProcess:
                supervisor = None
            found.append(TaskProcess(ti_id, dag, task, run, index, try_number, runner, supervisor))
        return found

    @staticmethod
    def wait_until(
        condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["EXECUTORS", "AirflowStack", "TaskProcess", "free_port"]
