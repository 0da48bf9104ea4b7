"""The effect handle given to user code, and the small values around it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from eos_airflow.errors import BadKeyError, ResultError

#: Longest key accepted. Keys are primary-key values: PostgreSQL's btree entries stop near
#: 2,700 bytes, and 1,000 characters leaves room for multi-byte text.
MAX_KEY_CHARS = 1000
#: Default bound on a stored result. Results travel as XCom and live in the ledger row: large
#: outputs belong in a table, with a reference returned.
MAX_RESULT_BYTES = 1024 * 1024
ON_COMMITTED = ("skip", "replace", "fail")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Origin:
    """Who runs an attempt. Tries of one origin fence each other by try number; attempts of
    different origins (another run, another script) wait for each other instead."""

    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    map_index: int | None = None


@dataclass(frozen=True)
class Previous:
    """The committed effect that an ``on_committed="replace"`` attempt supersedes."""

    result: Any
    version: int
    committed_at: datetime | None


@dataclass
class Effect:
    """The open effect: write through ``conn``; the ledger commits with your writes.

    ``conn`` is inside the effect's transaction: do not commit or roll it back yourself.
    """

    key: str
    attempt: int
    conn: psycopg.Connection[Any]
    previous: Previous | None = None
    origin: Origin = field(default_factory=Origin)

    @property
    def conns(self) -> dict[str, psycopg.Connection[Any]]:
        """Connections by target name (one target, named ``"default"``, in a local effect)."""
        return {"default": self.conn}

    def __repr__(self) -> str:
        return f"<Effect key={self.key!r} attempt={self.attempt}>"


def check_key(key: object) -> str:
    """Return ``key`` if it is usable as an effect key, else raise :class:`BadKeyError`."""
    if not isinstance(key, str):
        raise BadKeyError(f"effect key must be a string, got {type(key).__name__}: {key!r}")
    if not key.strip():
        raise BadKeyError(
            "effect key is empty; pass key= a non-empty string such as 'sales/{{ ds }}'"
        )
    if len(key) > MAX_KEY_CHARS:
        raise BadKeyError(
            f"effect key is {len(key)} characters, the limit is {MAX_KEY_CHARS}; "
            "use a shorter key (e.g. a hash of the long part)"
        )
    bad = _CONTROL.search(key)
    if bad:
        raise BadKeyError(
            f"effect key {key!r} contains control character {bad.group()!r}; "
            "keys are printable text"
        )
    return key


def encode_result(result: Any, *, limit: int = MAX_RESULT_BYTES) -> str:
    """Encode the function's return value as the JSON stored in the ledger.

    Raises :class:`ResultError` (before anything commits) when it is not JSON or too large.
    """
    try:
        text = json.dumps(result, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ResultError(
            f"the result must be JSON (dict, list, str, int, float, bool or None), "
            f"got {type(result).__name__}: {exc}; return plain data, e.g. str() a datetime"
        ) from None
    if "\x00" in text:
        raise ResultError("the result contains a NUL character, which PostgreSQL cannot store")
    size = len(text.encode())
    if size > limit:
        raise ResultError(
            f"the result is {size:,} bytes of JSON, the limit is {limit:,}; store large "
            "outputs in a table and return a reference (or raise max_result_bytes)"
        )
    return text
