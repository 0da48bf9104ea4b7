"""Ledger tier: what an effect key may be (the ledger's primary key)."""

from __future__ import annotations

import re

from eos_airflow.errors import BadKeyError

#: Longest key accepted. Keys are primary-key values: PostgreSQL's btree entries stop near
#: 2,700 bytes, and 1,000 characters leaves room for multi-byte text.
MAX_KEY_CHARS = 1000

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


__all__ = ["MAX_KEY_CHARS", "check_key"]
