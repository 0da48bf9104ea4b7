"""Faces tier: ``eos-airflow recover`` for transactions across several databases (docs/twophase.md).

Participants come from the decision log (their Airflow connection ids, resolved through
Airflow) or from ``--participant NAME=DSN``; ``--terminate`` runs the three-phase-commit
termination protocol on the participants alone, for when the coordinator is down.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import psycopg

from eos_airflow.api import check_dsn
from eos_airflow.cli import output
from eos_airflow.errors import ConfigurationError, DatabaseUnavailableError
from eos_airflow.ledger import connection
from eos_airflow.protocol.recovery import DEFAULT_GRACE, Resolution, recover, terminate

_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
COLUMNS = ("txid", "key", "protocol", "outcome", "participants", "detail")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grace",
        default=f"{DEFAULT_GRACE:g}s",
        help="leave undecided prepared transactions younger than this alone "
        "(their attempt may be about to decide; default 60s)",
    )
    parser.add_argument(
        "--participant",
        action="append",
        default=[],
        metavar="NAME=DSN",
        help="a participant database by name (repeat); without Airflow, or "
        "to scan it for prepared transactions the decision log lacks",
    )
    parser.add_argument(
        "--terminate",
        action="store_true",
        help="coordinator down: finish 3PC transactions from the participants' "
        "votes (needs every --participant); 2PC ones wait for the coordinator",
    )


def grace_seconds(value: str) -> float:
    match = _SECONDS.match(value.strip())
    if not match:
        raise ConfigurationError(f"--grace {value!r} is not a duration such as 60s, 5m or 0")
    return float(match[1]) * _UNIT[match[2]]


def participants(values: list[str]) -> dict[str, Callable[[], psycopg.Connection[Any]]]:
    found: dict[str, Callable[[], psycopg.Connection[Any]]] = {}
    for value in values:
        name, sep, dsn = value.partition("=")
        if not sep or not name.strip() or not dsn.strip():
            raise ConfigurationError(  # the value is not shown: it may hold a password
                "a --participant value is not NAME=DSN, e.g. --participant "
                "a=postgresql://host/bank_a (NAME as in the task's targets=)"
            )
        check_dsn(dsn.strip())
        found[name.strip()] = _connector(dsn.strip())
    return found


def _connector(dsn: str) -> Callable[[], psycopg.Connection[Any]]:
    def connect() -> psycopg.Connection[Any]:
        try:
            return connection.connect(
                dsn, application_name="eos-airflow recover", where="a participant"
            )
        except DatabaseUnavailableError as exc:
            raise DatabaseUnavailableError(
                f"{exc}; or leave the participant out while it is down (its transactions wait)"
            ) from exc.__cause__

    return connect


def _by_conn_id(conn_id: str) -> Callable[[], psycopg.Connection[Any]]:
    from eos_airflow.hooks.ledger import connect_factory

    return connect_factory(conn_id)


def run(args: argparse.Namespace, conn: psycopg.Connection[Any] | None) -> list[dict[str, Any]]:
    """Finish in-doubt transactions; ``conn`` is the coordinator (None with --terminate)."""
    # stdout carries the command's output; Airflow's logging (loaded for --conn-id) writes
    # there too, so the per-transaction log lines stay quiet: the report says the same
    logging.getLogger("eos_airflow.protocol").setLevel(logging.WARNING)
    given = participants(args.participant)
    grace = grace_seconds(args.grace)
    if conn is None:
        if len(given) < 2:
            raise ConfigurationError(
                "--terminate decides from the participants alone: pass every participant, "
                "e.g. --participant a=DSN --participant b=DSN"
            )
        done: list[Resolution] = terminate(given, schema=args.schema, grace=grace)
    else:
        done = recover(
            conn, schema=args.schema, participants=given, by_conn_id=_by_conn_id, grace=grace
        )
    return [asdict(r) for r in done]


def show(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no in-doubt transactions: nothing is prepared and undecided")
        return
    shown = [{**r, "participants": ", ".join(r["participants"])} for r in rows]
    output.table(args, f"{len(rows)} in-doubt transactions", COLUMNS, shown)
