"""Errors in one module: every error class, the ledger's SQLSTATEs registered once, and
retryability decided by the class (or the SQLSTATE), never set on an instance."""

from __future__ import annotations

import ast
import inspect
import re

import pytest

from eos_airflow import errors
from eos_airflow.errors import (
    LEDGER_SQLSTATES,
    EosError,
    FencedError,
    InDoubtError,
    MisuseError,
    ParticipantError,
    UserCodeError,
    ledger_error_class,
)
from tests.conftest import ROOT

SCHEMA_SQL = ROOT / "eos_airflow" / "ledger" / "sql" / "schema.sql"


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def test_every_error_class_is_defined_in_errors_and_exported_at_the_top():
    import eos_airflow.cli.main  # noqa: F401  (load every module that might define one)
    import eos_airflow.protocol.ingest  # noqa: F401
    import eos_airflow.relay  # noqa: F401

    ours = {c for c in _subclasses(EosError) if c.__module__.startswith("eos_airflow")}
    elsewhere = sorted(
        f"{c.__module__}.{c.__name__}" for c in ours if c.__module__ != errors.__name__
    )
    assert not elsewhere, f"error classes outside eos_airflow/errors.py: {elsewhere}"
    missing = sorted(c.__name__ for c in ours if getattr(eos_airflow, c.__name__, None) is not c)
    assert not missing, f"not importable from eos_airflow: {missing}"
    assert set(eos_airflow.__all__) >= {c.__name__ for c in ours}


def test_every_sqlstate_the_ledger_raises_is_registered_once():
    raised = set(re.findall(r"ERRCODE = '(EOS\d\d)'", SCHEMA_SQL.read_text("utf-8")))
    assert raised, "schema.sql raises no EOS SQLSTATE?"
    assert raised <= set(LEDGER_SQLSTATES), sorted(raised - set(LEDGER_SQLSTATES))
    from eos_airflow.protocol.pooling import POOLING_CODE

    assert POOLING_CODE in LEDGER_SQLSTATES
    for code, entry in LEDGER_SQLSTATES.items():
        assert issubclass(entry.error, EosError) and entry.meaning, code


def test_no_module_matches_a_ledger_sqlstate_by_its_literal():
    """SQLSTATE literals live in errors.py only; code compares with its named constants."""
    found = []
    for path in sorted((ROOT / "eos_airflow").rglob("*.py")):
        if path.name == "errors.py" or "migrations" in path.parts:
            continue
        for lineno, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if re.search(r"""["']EOS\d\d["']""", line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not found, "\n".join(found)


class _Fake(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def test_ledger_error_class_reads_the_table():
    assert ledger_error_class(_Fake("EOS01")) is FencedError
    assert ledger_error_class(_Fake("EOS07")) is InDoubtError
    assert ledger_error_class(_Fake("23505")) is None
    assert ledger_error_class(ValueError("no sqlstate")) is None


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (UserCodeError("x"), True),
        (UserCodeError("x", sqlstate="40001"), True),  # serialization failure
        (UserCodeError("x", sqlstate="23505"), False),  # unique violation
        (UserCodeError("x", sqlstate="42P01"), False),  # undefined table
        (MisuseError("x"), False),
        (ParticipantError("x"), False),
        (ParticipantError("x", sqlstate="40P01"), True),  # deadlock
        (ParticipantError("x", sqlstate="22012"), False),  # division by zero
        (FencedError("x"), False),
        (InDoubtError("x"), True),
    ],
)
def test_retryability_follows_the_class_and_the_sqlstate(error, retryable):
    assert error.retryable is retryable


def test_nothing_sets_retryable_on_an_instance():
    found = []
    for path in sorted((ROOT / "eos_airflow").rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and target.attr == "retryable"
                        and not (isinstance(target.value, ast.Name) and target.value.id == "cls")
                    ):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"retryable assigned on an instance: {found}"
    assert inspect.isdatadescriptor(UserCodeError.__dict__["retryable"])
