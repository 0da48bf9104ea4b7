"""The ledger's words, each spelled once (eos_airflow/states.py): the enums match the
database's own types, and ``on_committed`` is checked by one function with one error."""

from __future__ import annotations

import psycopg
import pytest

from eos_airflow import ConfigurationError, Ledger, MultiLedger, Origin
from eos_airflow.states import Action, EntryState, EventKind, OnCommitted, check_on_committed


def _enum_labels(dsn: str, type_name: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT e.enumlabel FROM pg_enum AS e JOIN pg_type AS t ON t.oid = e.enumtypid "
                "JOIN pg_namespace AS n ON n.oid = t.typnamespace "
                "WHERE n.nspname = 'eos' AND t.typname = %s ORDER BY e.enumsortorder",
                [type_name],
            )
        ]


def test_entry_states_and_event_kinds_are_the_databases(db: str):
    """A migrated ledger's enum types hold exactly the enums' members, in order."""
    assert _enum_labels(db, "effect_state") == list(EntryState)
    assert _enum_labels(db, "event_kind") == list(EventKind)


def test_members_are_their_words():
    assert EntryState.COMMITTED == "committed" and f"{Action.RECOVERED}" == "recovered"
    import json

    assert json.dumps({"a": Action.SKIPPED}) == '{"a": "skipped"}'


def test_the_outcome_names_what_happened(ledger: Ledger):
    origin = Origin("d", "t", "r", -1)
    first = ledger.run_outcome("k", lambda eos: 1, origin=origin)
    again = ledger.run_outcome("k", lambda eos: 2, origin=origin)
    replaced = ledger.run_outcome("k", lambda eos: 3, origin=origin, on_committed="replace")
    assert (first.action, again.action, replaced.action) == (
        Action.COMMITTED,
        Action.SKIPPED,
        Action.REPLACED,
    )
    assert all(isinstance(o.action, Action) for o in (first, again, replaced))


MESSAGE = r"on_committed='sometimes' is not valid; choose one of skip, replace, fail"


def test_one_check_and_one_error_for_a_bad_on_committed(ledger: Ledger, db: str):
    assert check_on_committed("replace") is OnCommitted.REPLACE
    with pytest.raises(ConfigurationError, match=MESSAGE):
        check_on_committed("sometimes")
    with pytest.raises(ConfigurationError, match=MESSAGE):
        ledger.run("k", lambda eos: 1, on_committed="sometimes")
    with (
        MultiLedger(db, {"a": db, "b": db}) as multi,
        pytest.raises(ConfigurationError, match=MESSAGE),
    ):
        multi.run_outcome("k", lambda eos: 1, on_committed="sometimes")
    from eos_airflow import ExactlyOnceSQLOperator, exactly_once

    with pytest.raises(ConfigurationError, match=MESSAGE):
        ExactlyOnceSQLOperator(task_id="t", conn_id="c", sql="SELECT 1", on_committed="sometimes")
    from airflow.sdk import DAG

    def load(eos):
        return 1

    with DAG("states_check", schedule=None), pytest.raises(ConfigurationError, match=MESSAGE):
        exactly_once(conn_id="c", on_committed="sometimes")(load)()  # the task is made here
    # also a ValueError: a bad operator argument fails the DAG file's import
    assert issubclass(ConfigurationError, ValueError)
    with pytest.raises(ValueError, match=MESSAGE):
        check_on_committed("sometimes")
