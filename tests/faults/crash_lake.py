"""The lakehouse protocols of the crash matrix: Iceberg appends committed with the ledger
(``eos.iceberg``) and Delta writes made idempotent by their transaction marker
(``eos.delta``), each on ``file://`` and on the S3 API.

Every item a key writes is one row ``(key, i, n, attempt)``: ``n`` is the key's size, so a
reader can tell a complete effect (rows 1..n of one attempt) from a partial one without
knowing the run. Reads of the tables happen only in forked children or in a separate reader
process: delta-rs's runtime and the AWS SDK must not start in the test process before it
forks (neither survives a fork).

While an Iceberg scenario runs, a reader process polls the table through a stock
``SqlCatalog("eos", ...)`` and counts the views in which some key is partial (some of its
rows, or rows of two attempts) or duplicated: the matrix asserts there are none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

from eos_airflow import Ledger, Origin
from tests.faults.crash import Job, Run, Scenario, run_child

TABLE = "crash.items"

#: The polling reader: prints one JSON line with its counts when its stdin closes.
POLLER = r"""
import json, select, sys, time
from collections import defaultdict
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import NoSuchTableError

uri, warehouse, props = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
catalog = SqlCatalog("eos", uri=uri, warehouse=warehouse, **props)
polls = partial = 0
examples = []
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        data = catalog.load_table("crash.items").scan().to_arrow()
    except NoSuchTableError:
        time.sleep(0.05)
        continue
    seen = defaultdict(list)
    for key, i, n, attempt in zip(*(data[c].to_pylist() for c in ("key", "i", "n", "attempt"))):
        seen[key].append((i, n, attempt))
    polls += 1
    for key, items in seen.items():
        n = items[0][1]
        if sorted(i for i, _, _ in items) != list(range(1, n + 1)) or len({a for *_, a in items}) != 1:
            partial += 1
            if len(examples) < 3:
                examples.append({"key": key, "rows": sorted(items)[:6], "count": len(items)})
    time.sleep(0.02)
print(json.dumps({"polls": polls, "partial": partial, "examples": examples}), flush=True)
"""


def _rows(key: str, size: int, attempt: int) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "key": [key] * size,
            "i": list(range(1, size + 1)),
            "n": [size] * size,
            "attempt": [attempt] * size,
        },
        schema=_schema(),
    )


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("i", pa.int64()),
            pa.field("n", pa.int64()),
            pa.field("attempt", pa.int64()),
        ]
    )


class _Lake(Scenario):
    """What both lakehouse targets share: the storage, the checks of what the table holds."""

    #: "file" or "s3"; the fixture gives ``root`` (a fresh location) and the client settings.
    storage = "file"

    def __init__(self, dsns: dict[str, str], rng: Any, big: bool) -> None:
        super().__init__(dsns, rng, big)
        self.root = ""
        self.iceberg_properties: dict[str, str] = {}
        self.delta_options: dict[str, str] = {}
        # imported before the children fork (each would import them again); nothing of
        # them runs here
        import deltalake  # noqa: F401
        import pyarrow  # noqa: F401
        import pyiceberg.catalog.sql  # noqa: F401

    def job(self, key: str, index: int) -> Job:
        return Job(key, index, self.rng.randint(1, 60 if self.big else 20))

    def read(self) -> list[tuple[str, int, int, int]]:
        """Every row of the table, read in a forked child."""
        rows: list[tuple[str, int, int, int]] = []

        def body(report):
            data = self.table_data()
            columns = (data[c].to_pylist() for c in ("key", "i", "n", "attempt"))
            report({"rows": list(zip(*columns, strict=True))})

        code, lines = run_child(body)
        assert code == 0, lines
        for line in lines:
            rows.extend(tuple(r) for r in line.get("rows", []))
        return rows

    def table_data(self) -> Any:
        raise NotImplementedError

    def orphans(self, *target: str) -> dict[str, Any]:
        """``eos-airflow lake orphans --delete`` once every run ended (the files of rolled-back
        and fenced attempts), then the table must read as before: ``{"orphans": N}``."""
        before = Counter(self.read())
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "eos_airflow.cli.main",
                "lake",
                "orphans",
                "--dsn",
                self.dsn,
                "--older-than",
                "0s",
                "--delete",
                "--json",
                *target,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if k != "EOS_FAILPOINTS"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        found = json.loads(done.stdout)
        assert Counter(self.read()) == before, "deleting orphan files changed the table"
        return {"orphans": found["count"]}

    def check_target(self, run: Run) -> None:
        by_key: dict[str, list[tuple[int, int]]] = {}
        for key, i, _, attempt in self.read():
            by_key.setdefault(key, []).append((i, attempt))
        for job in run.jobs:
            items = sorted(by_key.get(job.key, []))
            attempts = {a for _, a in items}
            assert [i for i, _ in items] == list(range(1, job.size + 1)) and len(attempts) == 1, (
                f"{job.key}: rows {items[:5]}... are not rows 1..{job.size} of one attempt "
                "(duplicates or partial writes)"
            )

    def target_counts(self) -> tuple[int, int]:
        found = Counter((key, i) for key, i, _, _ in self.read())
        want = {(job.key, i) for job in self.jobs for i in range(1, job.size + 1)}
        duplicates = sum(n - 1 for n in found.values()) + len(set(found) - want)
        return duplicates, len(want - set(found))


class Iceberg(_Lake):
    """``eos.iceberg(...).append``: the snapshot commits in the ledger's transaction."""

    name = "iceberg"
    steps = ("after_claim", "before_commit", "after_commit")

    def setup(self) -> None:
        self.poller: subprocess.Popen[str] | None = None

        def create(report):
            with Ledger(self.dsn) as ledger:
                ledger.run(
                    "create",
                    lambda eos: bool(
                        eos.iceberg(
                            TABLE,
                            schema=_schema(),
                            warehouse=self.warehouse,
                            properties=self.iceberg_properties,
                        )
                    ),
                )

        code, lines = run_child(create)
        assert code == 0, lines
        self.keys.append("create")
        from eos_airflow.protocol.iceberg import reader_uri

        self.poller = subprocess.Popen(
            [
                sys.executable,
                "-c",
                POLLER,
                reader_uri(self.dsn),
                self.warehouse,
                json.dumps(self.iceberg_properties),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def warehouse(self) -> str:
        return f"{self.root}/warehouse"

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        def fn(eos):
            table = eos.iceberg(TABLE, properties=self.iceberg_properties)
            table.append(_rows(eos.key, job.size, eos.attempt))
            return {"rows": job.size, "attempt": eos.attempt}

        with Ledger(self.dsn, wait_timeout=wait_timeout) as ledger:
            return ledger.run(job.key, fn, attempt=attempt, origin=origin)

    def table_data(self) -> Any:
        from pyiceberg.catalog.sql import SqlCatalog

        from eos_airflow.protocol.iceberg import reader_uri

        catalog = SqlCatalog(
            "eos", uri=reader_uri(self.dsn), warehouse=self.warehouse, **self.iceberg_properties
        )
        return catalog.load_table(TABLE).scan().to_arrow()

    def check_target(self, run: Run) -> None:
        super().check_target(run)
        for job in run.jobs:  # each key's snapshot is the committed attempt's
            assert run.told[job.key]["rows"] == job.size

    def finish(self) -> dict[str, Any]:
        out = super().finish()
        out.update(self.stop_poller())
        options = [f"--property={k}={v}" for k, v in self.iceberg_properties.items()]
        out.update(self.orphans("--table", TABLE, *options))
        return out

    def stop_poller(self) -> dict[str, Any]:
        if self.poller is None:
            return {}
        poller, self.poller = self.poller, None
        out, _ = poller.communicate("stop\n", timeout=60)
        assert poller.returncode == 0, out
        return json.loads(out.strip().splitlines()[-1])


class Delta(_Lake):
    """``eos.delta(...).write``: Delta's commit first, with the effect's marker; the ledger's
    after. A retry after ``after_delta_commit`` finds the marker and writes nothing."""

    name = "delta"
    steps = ("after_claim", "after_delta_commit", "before_commit", "after_commit")

    @property
    def uri(self) -> str:
        return f"{self.root}/items"

    def setup(self) -> None:
        def create(report):
            from deltalake import write_deltalake

            write_deltalake(
                self.uri, _schema().empty_table(), storage_options=self.delta_options or None
            )

        code, lines = run_child(create)
        assert code == 0, lines

    def one(self, job: Job, attempt: int, origin: Origin, wait_timeout: float) -> Any:
        def fn(eos):
            target = eos.delta(self.uri, storage_options=self.delta_options)
            written = target.write(_rows(eos.key, job.size, eos.attempt))
            return {"rows": job.size, "txn_version": written["txn_version"]}

        with Ledger(self.dsn, wait_timeout=wait_timeout) as ledger:
            return ledger.run(job.key, fn, attempt=attempt, origin=origin)

    def table_data(self) -> Any:
        from deltalake import DeltaTable

        return DeltaTable(self.uri, storage_options=self.delta_options or None).to_pyarrow_table()

    def finish(self) -> dict[str, Any]:
        out = super().finish()

        def markers(report):
            from deltalake import DeltaTable

            table = DeltaTable(self.uri, storage_options=self.delta_options or None)
            report({"markers": {k: table.transaction_version(k) for k in self.keys}})

        code, lines = run_child(markers)
        assert code == 0, lines
        found = next(line["markers"] for line in lines if "markers" in line)
        missing = sorted(k for k, v in found.items() if v != 1)
        assert not missing, f"keys whose Delta marker is not version 1: {missing[:5]}"
        options = [f"--storage-option={k}={v}" for k, v in self.delta_options.items()]
        out.update(self.orphans("--delta", self.uri, *options))
        return out


class IcebergS3(Iceberg):
    name = "iceberg-s3"
    storage = "s3"


class DeltaS3(Delta):
    name = "delta-s3"
    storage = "s3"
