"""Ledger tier: create and upgrade the ledger schema with Alembic (``eos-airflow db migrate``).

The Alembic version table lives inside the ledger schema, next to ``schema_migrations``,
which records every revision applied with the checksum of what it ran (:func:`checksum`: the
revision's wrapper and the SQL files it executes). Two migrations started at once serialise on
an advisory lock and the second finds nothing to do.

Shipped revisions are frozen (tests/ledger/test_shipped_migrations.py holds each file to
``migrations/SHIPPED.sha256``); ``sql/schema.sql`` is the readable reference of the schema they
build, tested equal to it. Databases are created and upgraded only by the migrations.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Callable, Iterable
from enum import StrEnum
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg import errors as pgerrors

from eos_airflow.errors import LedgerSchemaError
from eos_airflow.ledger.keys import check_schema
from eos_airflow.ledger.store import LedgerStore

#: Advisory lock key taken by every migration run ("eos-mig" in ASCII).
MIGRATION_LOCK = 0x656F732D6D6967


def _script_location() -> Path:
    return Path(str(resources.files("eos_airflow.ledger").joinpath("migrations")))


def _config(schema: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_script_location()))
    config.attributes["schema"] = schema
    return config


@functools.cache
def _scripts() -> tuple[tuple[str, Path], ...]:
    scripts = ScriptDirectory.from_config(_config("eos"))
    return tuple((s.revision, Path(s.path).resolve()) for s in scripts.walk_revisions())


def script_paths() -> dict[str, Path]:
    """Every shipped revision and its migration file."""
    return dict(_scripts())


def _ledger_root() -> Path:
    return Path(str(resources.files("eos_airflow.ledger"))).resolve()


def revision_files(revision: str) -> list[Path]:
    """What ``revision`` runs: its wrapper (``migrations/versions/*.py``), then every SQL file
    of ``sql/`` the wrapper names (``execute_script(..., "0004_checkpoints.sql", ...)``), in
    the order it names them."""
    wrapper = script_paths()[revision]
    sql_dir = _ledger_root() / "sql"
    files = [wrapper]
    calls = [
        n
        for n in ast.walk(ast.parse(wrapper.read_bytes(), str(wrapper)))
        if isinstance(n, ast.Call)
    ]
    for call in sorted(calls, key=lambda n: (n.lineno, n.col_offset)):
        for arg in call.args:
            if (
                isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and arg.value.endswith(".sql")
            ):
                path = sql_dir / arg.value
                if not path.is_file():
                    raise RuntimeError(f"migration {wrapper.name} runs {arg.value}, not in sql/")
                if path not in files:
                    files.append(path)
    return files


def checksum_of(files: Iterable[Path], root: Path) -> str:
    """sha256 of the ``sha256sum`` listing of ``files`` (paths relative to ``root``): the same
    as ``cd root && sha256sum FILE... | sha256sum``."""
    listing = "".join(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(root).as_posix()}\n"
        for path in files
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def checksum(revision: str) -> str:
    """The checksum recorded for ``revision`` in ``schema_migrations``: over its wrapper and
    the SQL it executes (:func:`revision_files`), relative to ``eos_airflow/ledger``."""
    return checksum_of(revision_files(revision), _ledger_root())


def wrapper_checksum(revision: str) -> str:
    """The checksum eos-airflow recorded before it covered the SQL: the wrapper's sha256.
    Revisions applied then keep it; :func:`checksum_state` accepts it for them."""
    return hashlib.sha256(script_paths()[revision].read_bytes()).hexdigest()


class ChecksumState(StrEnum):
    """How a recorded checksum compares with this package's files of its revision."""

    MATCH = "match"  # wrapper and SQL are the files that ran
    WRAPPER = "wrapper"  # recorded by an earlier eos-airflow: the wrapper's sha256 matches
    CHANGED = "changed"  # matches neither form: a file changed since the revision ran
    UNKNOWN = "unknown"  # a revision this package does not ship (a newer eos-airflow's)


def checksum_state(revision: str, recorded: str | None) -> ChecksumState:
    """Compare the checksum ``recorded`` for ``revision`` with this package's files."""
    if revision not in script_paths():
        return ChecksumState.UNKNOWN
    if recorded == checksum(revision):
        return ChecksumState.MATCH
    if recorded == wrapper_checksum(revision):
        return ChecksumState.WRAPPER
    return ChecksumState.CHANGED


def down_revision(revision: str) -> str | None:
    """The revision ``revision`` upgrades from (None for the first)."""
    down = ScriptDirectory.from_config(_config("eos")).get_revision(revision).down_revision
    assert down is None or isinstance(down, str), "the ledger's revisions form one line"
    return down


def head_revision() -> str:
    """The newest schema revision this package ships."""
    head = ScriptDirectory.from_config(_config("eos")).get_current_head()
    assert head is not None
    return head


def _engine(connect: Callable[[], psycopg.Connection[Any]]) -> sa.Engine:
    # A DSN may be a libpq key/value string and an Airflow connection comes from its hook,
    # neither of which a SQLAlchemy URL expresses: let SQLAlchemy use the connection we open.
    def creator() -> psycopg.Connection[Any]:
        conn = connect()
        conn.autocommit = False
        return conn

    return sa.create_engine("postgresql+psycopg://", creator=creator, poolclass=sa.NullPool)


def migrate(
    target: str | Callable[[], psycopg.Connection[Any]],
    schema: str = "eos",
    *,
    revision: str = "head",
) -> list[str]:
    """Apply every pending migration to ``target`` (a DSN or a connection factory) and
    return the revisions applied (empty when the schema is up to date). ``revision`` stops
    at an earlier revision (upgrade tests)."""
    check_schema(schema)
    applied: list[str] = []
    config = _config(schema)
    config.attributes["applied"] = applied
    connect = (lambda: psycopg.connect(target)) if isinstance(target, str) else target
    engine = _engine(connect)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except sa.exc.DBAPIError as exc:
        # SQLAlchemy wraps the driver's errors (e.g. a refused connection); callers, like
        # `db migrate`, handle psycopg's own.
        if isinstance(exc.orig, psycopg.Error):
            raise exc.orig from exc
        raise
    finally:
        engine.dispose()
    return applied


def current_revision(conn: psycopg.Connection[Any], schema: str) -> str | None:
    """The schema revision stored in the database, or None if the ledger was never migrated."""
    try:
        with conn.transaction():
            return LedgerStore(conn, schema).revision()
    except (pgerrors.UndefinedTable, pgerrors.InvalidSchemaName, LedgerSchemaError):
        return None


def check_revision(conn: psycopg.Connection[Any], schema: str) -> str:
    """Raise :class:`LedgerSchemaError` unless the ledger is at this package's head revision."""
    found = current_revision(conn, schema)
    head = head_revision()
    if found == head:
        return found
    if found is None:
        raise LedgerSchemaError(
            f'ledger schema "{schema}" is missing in this database; '
            "create it with `eos-airflow db migrate` (same --dsn/--conn-id)"
        )
    known = {s.revision for s in ScriptDirectory.from_config(_config(schema)).walk_revisions()}
    if found not in known:
        raise LedgerSchemaError(
            f'ledger schema "{schema}" is at revision {found}, written by a newer eos-airflow '
            f"(this one knows up to {head}); upgrade eos-airflow on this machine"
        )
    raise LedgerSchemaError(
        f'ledger schema "{schema}" is at revision {found}, this eos-airflow needs {head}; '
        "run `eos-airflow db migrate`"
    )


def record_applied(*, ctx: Any, step: Any, heads: Any, run_args: Any) -> None:
    """Alembic ``on_version_apply`` hook: record the revision and the checksum of what it
    ran (:func:`checksum`)."""
    revision = step.up_revision
    config = ctx.config
    schema = config.attributes["schema"]
    table = sa.table(
        "schema_migrations",
        sa.column("revision"),
        sa.column("description"),
        sa.column("checksum"),
        sa.column("package_version"),
        schema=schema,
    )
    ctx.connection.execute(
        table.insert().values(
            revision=revision.revision,
            description=(revision.doc or "").strip(),
            checksum=checksum(revision.revision),
            package_version=_package_version(),
        )
    )
    config.attributes.setdefault("applied", []).append(revision.revision)


def _package_version() -> str:
    try:
        return metadata.version("eos-airflow")
    except metadata.PackageNotFoundError:
        return "unknown"
