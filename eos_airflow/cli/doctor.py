"""Faces tier: ``eos-airflow doctor``: check the database settings, schema, privileges and claims."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import psycopg

from eos_airflow.cli import output
from eos_airflow.errors import LedgerSchemaError
from eos_airflow.ledger.connection import Liveness, check_session
from eos_airflow.ledger.migrate import ChecksumState, check_revision, checksum_state
from eos_airflow.ledger.roles import direct_writers
from eos_airflow.ledger.store import AppliedMigration, LedgerStore
from eos_airflow.protocol.pooling import POOL_MODE_ENV, behind_pooler, declared_session_pooling

MIN_SERVER_VERSION = 140000

OK, WARN, FAIL = "ok", "warn", "fail"


def diagnose(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, str]]:
    """Every check as {check, status, detail}; FAIL means tasks cannot run exactly once."""
    checks: list[dict[str, str]] = []

    def add(check: str, status: str, detail: str) -> None:
        checks.append({"check": check, "status": status, "detail": detail})

    version = conn.info.server_version
    add(
        "server version",
        OK if version >= MIN_SERVER_VERSION else FAIL,
        f"PostgreSQL {version // 10000}.{version % 10000}"
        + ("" if version >= MIN_SERVER_VERSION else "; eos-airflow needs 14 or newer"),
    )
    alive, detail = check_session(conn, Liveness.of())
    add("liveness", OK if alive else WARN, detail)
    try:
        revision = check_revision(conn, schema)
    except LedgerSchemaError as exc:
        add("schema revision", FAIL, str(exc))
        return checks
    add("schema revision", OK, f'schema "{schema}" at revision {revision}')

    store = LedgerStore(conn, schema)
    add(*_checksums(store.applied_migrations()))

    add(*_pooler(conn))
    facts = store.server_facts()
    add(*_effect_probe(conn, schema, facts.role, facts.can_claim))
    writers = direct_writers(conn, schema)
    add(
        "direct writes",
        WARN if writers else OK,
        "roles that may write ledger tables directly, and so forge history: "
        + "; ".join(f"{w['role']} ({w['privileges']} on {w['table']})" for w in writers)
        + ". Re-apply `eos-airflow db grant --writer ROLE --auditor ROLE` (tasks need only "
        "the protocol's functions), or REVOKE those privileges"
        if writers
        else "only the owner writes the ledger's tables; other roles go through its functions",
    )
    add(
        "append-only events",
        OK if facts.append_only else FAIL,
        "trigger ledger_events_append_only is enabled"
        if facts.append_only
        else "trigger ledger_events_append_only is disabled: history can be edited; "
        f"ALTER TABLE {schema}.ledger_events ENABLE TRIGGER ledger_events_append_only",
    )
    add(
        "synchronous_commit",
        OK if facts.synchronous_commit in ("on", "remote_apply", "remote_write", "local") else WARN,
        f"synchronous_commit = {facts.synchronous_commit}"
        + (
            ""
            if facts.synchronous_commit != "off"
            else "; a server crash can lose the last commits: set it to on for the target database"
        ),
    )
    prepared = facts.max_prepared_transactions
    add(
        "max_prepared_transactions",
        OK if prepared > 0 else WARN,
        f"{prepared}"
        + (
            ""
            if prepared > 0
            else " — fine for single-database effects; effects across several "
            "databases (two-phase commit) need it > 0 on every target database: "
            "ALTER SYSTEM SET max_prepared_transactions = 64, then restart "
            "PostgreSQL"
        ),
    )
    in_doubt = store.in_doubt_count()
    add(
        "in-doubt transactions",
        OK if in_doubt == 0 else WARN,
        "none"
        if in_doubt == 0
        else f"{in_doubt} prepared transactions of multi-database effects are older than a minute "
        "(they hold their row locks): run `eos-airflow recover` against their coordinator",
    )
    orphaned = store.orphaned_claims()
    add(
        "claims of dead owners",
        OK if orphaned == 0 else WARN,
        "none"
        if orphaned == 0
        else f"{orphaned} running keys belong to sessions that ended (crashed attempts); the next "
        "claim of each key takes it over",
    )
    return checks


def _checksums(applied: list[AppliedMigration]) -> tuple[str, str, str]:
    """Each applied revision's recorded checksum against this package's files of it: the
    wrapper and the SQL it runs; the wrapper alone for revisions recorded before checksums
    covered the SQL (ledger/migrate.py)."""
    states = {m.revision: checksum_state(m.revision, m.checksum) for m in applied}
    changed = [r for r, state in states.items() if state is ChecksumState.CHANGED]
    if changed:
        return (
            "migration checksums",
            WARN,
            f"applied migrations differ from the shipped files: {', '.join(changed)}",
        )
    detail = "every applied migration matches its files"
    wrapper_only = [r for r, state in states.items() if state is ChecksumState.WRAPPER]
    if wrapper_only:
        detail += (
            f" ({', '.join(wrapper_only)} recorded by an earlier eos-airflow with the checksum "
            "of the migration file only; it matches)"
        )
    return ("migration checksums", OK, detail)


def _pooler(conn: psycopg.Connection[Any]) -> tuple[str, str, str]:
    """A pooler between the ledger and PostgreSQL must pool sessions, declared on the workers
    (protocol/pooling.py)."""
    if not behind_pooler(conn):
        return ("connection pooler", OK, "none: this connection reaches PostgreSQL directly")
    if declared_session_pooling():
        return (
            "connection pooler",
            OK,
            f"a pooler answers this connection; {POOL_MODE_ENV}=session declares that it "
            "pools sessions (claims are refused if the server session changes under a "
            "connection)",
        )
    return (
        "connection pooler",
        FAIL,
        "a pooler answers this connection (its login key is not the server session's "
        "process id): claims through it are refused (EOS10). Use PgBouncer's "
        f"pool_mode = session for this database and set {POOL_MODE_ENV}=session on the "
        "workers, or connect directly to PostgreSQL",
    )


def _effect_probe(
    conn: psycopg.Connection[Any], schema: str, role: str, can_claim: bool | None
) -> tuple[str, str, str]:
    """Run a real claim and commit as this role, in a transaction that is rolled back: the
    privileges check PostgreSQL itself answers, whatever the grants look like."""
    if not can_claim:
        return (
            "privileges",
            WARN,
            f"role {role} may read the ledger but not run effects (no EXECUTE on "
            f"{schema}.claim): fine for an auditor; the role tasks use needs `eos-airflow "
            "db grant --writer ROLE --auditor ROLE` or the ledger's owner",
        )
    key = f"eos-doctor/probe/{uuid.uuid4()}"
    owner = uuid.uuid4()
    try:
        with conn.transaction(force_rollback=True):
            store = LedgerStore(conn, schema)
            store.claim(
                {
                    "key": key,
                    "owner": owner,
                    "attempt": 1,
                    "dag_id": "eos-doctor",
                    "task_id": "probe",
                    "run_id": "probe",
                    "map_index": -1,
                    "host": "doctor",
                    "pid": 0,
                    "on_committed": "skip",
                    "detail": None,
                },
            )
            store.commit_in_transaction(key, owner, "null")
    except psycopg.errors.InsufficientPrivilege as exc:
        return (
            "privileges",
            FAIL,
            f"role {role} cannot run an effect ({exc.diag.message_primary}); grant the "
            "role tasks use with `eos-airflow db grant --writer ROLE --auditor ROLE`",
        )
    finally:
        conn.execute("SELECT pg_advisory_unlock_all()")
    return ("privileges", OK, f"role {role} ran a claim and a commit (rolled back)")


def run(conn: psycopg.Connection[Any], args: argparse.Namespace) -> int:
    checks = diagnose(conn, args.schema)
    if args.format == "json":
        output.emit(args, {"checks": checks, "ok": all(c["status"] != FAIL for c in checks)}, str)
    elif args.format == "csv":
        output.write_csv(("check", "status", "detail"), checks)
    else:
        output.table(args, "eos-airflow doctor", ("check", "status", "detail"), checks)
    if any(c["check"] == "schema revision" and c["status"] == FAIL for c in checks):
        return 3  # like every other command: the schema is missing or at another revision
    return 1 if any(c["status"] == FAIL for c in checks) else 0
